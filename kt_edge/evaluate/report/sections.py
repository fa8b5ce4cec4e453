"""The report's sections, one function each, read from the run directory's artifacts; a section whose
artifact is absent says what is missing instead."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kt_edge_runtime.bundle import BundleError, load_bundle
from pydantic import ValidationError
from sklearn.metrics import confusion_matrix

from kt_edge.data.labelled import labelled_pair
from kt_edge.engine.metrics import read_records
from kt_edge.errors import DataError, KtEdgeError
from kt_edge.evaluate.compare import describe, format_value, read_bench, read_manifest, read_parity, read_results
from kt_edge.evaluate.knn import KnnSetting
from kt_edge.evaluate.protocols import Evaluation, evaluate_model
from kt_edge.evaluate.report.figures import accuracy_figure, confusion_figure, curves_figure, map_figure
from kt_edge.evaluate.report.render import Section, png, table, text
from kt_edge.models.checkpoint import load_backbone
from kt_edge.recipe import DataConfig, EvalConfig, KnnConfig
from kt_edge.run_dir import RunDir


def read_curves(path: Path) -> dict[str, list[dict]]:
    """Per stage, the records of its latest run sorted by step; a record at step 1 starts a new run.

    A resumed stage logs some steps again: the later record of a step wins.
    """
    stages: dict[str, dict[int, dict]] = {}
    for record in read_records(path):
        if not isinstance(record.get("step"), int) or "stage" not in record:
            continue
        steps = stages.setdefault(str(record["stage"]), {})
        if record["step"] == 1:
            steps.clear()
        steps[record["step"]] = record
    return {stage: [steps[s] for s in sorted(steps)] for stage, steps in stages.items() if steps}


def _loss(record: dict) -> str:
    value = record.get("loss")
    return f"{value:.4g}" if isinstance(value, (int, float)) else ""


def summary(run_dir: Path, recipe: dict) -> Section:
    section = Section("summary", "Run")
    who = describe(run_dir)
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    rows = [
        ["teacher", who["teacher"] or "missing"],
        ["distillation", who["distill"] or "missing"],
        ["student", who["student"] or "missing"],
        ["seed", str(recipe.get("seed", "missing (no recipe.yaml)"))],
    ]
    for split in ("train", "test"):
        source = data.get(split)
        if isinstance(source, dict):
            rows.append([f"data.{split}", str(source.get("path", ""))])
    table(section, ["", ""], rows)
    return section


def training(run_dir: Path) -> Section:
    section = Section("training", "Training curves")
    path = RunDir(run_dir).metrics
    if not path.is_file():
        section.missing = "no metrics.jsonl: no stage was trained in this run"
        return section
    curves = read_curves(path)
    if not curves:
        section.missing = "metrics.jsonl holds no training steps"
        return section
    section.html.append(png(curves_figure(curves)))
    rows = [[stage, str(len(r)), _loss(r[0]), _loss(r[-1])] for stage, r in curves.items()]
    table(section, ["stage", "steps", "first loss", "last loss"], rows)
    return section


def evaluation(run_dir: Path) -> Section:
    section = Section("evaluation", "Evaluation")
    results = read_results(run_dir)
    if not results:
        section.missing = "no eval/results.json: run `kt-edge eval` first"
        return section
    models = list(results)
    metrics = list(dict.fromkeys(name for m in models for name in results[m]))
    rows = [[name, *(format_value(name, results[m].get(name)) for m in models)] for name in metrics]
    table(section, ["metric", *(m.replace("_", "-") for m in models)], rows)
    text(section, "Accuracies in percent; NMI and ARI in 0..1; metrics prefixed transfer_ are on the transfer dataset.")
    return section


@dataclass
class Recomputed:
    """Embedding-based views of the saved models on a capped part of the recipe's data."""

    classes: list[str]
    bank_size: int
    test_size: int
    setting: KnnSetting
    evaluations: dict[str, Evaluation]  # teacher / student, each with its map sample
    knn_error: str | None  # why the student's k-NN could not run


def recompute(
    run_dir: Path, recipe: dict, seed: int, max_bank: int, max_test: int, map_points: int, device: str
) -> Recomputed | str:
    """The recomputed views, or the reason they cannot be made."""
    try:
        data = DataConfig.model_validate(recipe["data"])
        eval_cfg = EvalConfig.model_validate(recipe.get("eval") or {})
    except (KeyError, TypeError, ValidationError) as exc:
        return f"recipe.yaml has no usable data/eval section ({str(exc).splitlines()[0]})"
    if data.test is None:
        return "the recipe names no labelled test split (data.test)"
    capped = [
        s.model_copy(update={"subset": min(s.subset or cap, cap)})
        for s, cap in ((data.train, max_bank), (data.test, max_test))
    ]
    try:
        bank, test = labelled_pair(*capped, image_size=data.image_size, seed=seed)
    except KtEdgeError as exc:
        return str(exc)
    first = (eval_cfg.knn or [KnnConfig()])[0]
    knn_only = eval_cfg.model_copy(update={"protocols": ["knn"], "knn": [first]})
    map_only = eval_cfg.model_copy(update={"protocols": []})
    evaluations, knn_error = {}, "no student checkpoint"
    for stage in ("teacher", "student") if map_points else ("student",):
        try:
            model, _ = load_backbone(RunDir(run_dir).model(stage))
        except KtEdgeError:
            continue
        if stage == "student":
            try:
                evaluations[stage] = evaluate_model(model, bank, test, knn_only, seed, device, map_points=map_points)
                knn_error = None
                continue
            except DataError as exc:
                knn_error = str(exc)
        evaluations[stage] = evaluate_model(model, bank, test, map_only, seed, device, map_points=map_points)
    return Recomputed(bank.classes, len(bank), len(test), KnnSetting(first.k, first.t), evaluations, knn_error)


def map_view(views: Recomputed | str, seed: int, map_points: int) -> Section:
    section = Section("map", "2-D map of the test split (t-SNE)")
    if isinstance(views, str) or map_points == 0:
        section.missing = views if isinstance(views, str) else "map not asked for (map_points=0)"
        return section
    shown = {m: e for m, e in views.evaluations.items() if e.map_features is not None and len(e.map_features) >= 4}
    if not shown:
        section.missing = "no teacher or student checkpoint to embed"
        return section
    section.html.append(png(map_figure(shown, views.classes, seed)))
    missing = [m for m in ("teacher", "student") if m not in shown]
    text(section, "Coloured by true class." + (f" Missing: {', '.join(missing)} (no checkpoint)." if missing else ""))
    return section


def per_class(views: Recomputed | str) -> Section:
    section = Section("per-class", "Per-class k-NN accuracy of the student")
    if isinstance(views, str):
        section.missing = views
        return section
    student = views.evaluations.get("student")
    if views.knn_error is not None or student is None or student.knn_predictions is None:
        section.missing = views.knn_error or "no student k-NN predictions"
        return section
    n = len(views.classes)
    matrix = confusion_matrix(student.test_labels, student.knn_predictions, labels=np.arange(n))
    support = matrix.sum(axis=1)
    accuracy = np.where(support > 0, np.diag(matrix) / np.maximum(support, 1) * 100.0, np.nan)
    overall = float(np.trace(matrix) / matrix.sum() * 100.0)
    text(
        section,
        f"k-NN (k={views.setting.k}, T={views.setting.t:g}) with a bank of {views.bank_size} train "
        f"images, scored on {views.test_size} test images: top-1 {overall:.2f}%.",
    )

    section.html.append(png(accuracy_figure(views.classes, accuracy, overall)))
    section.html.append(png(confusion_figure(views.classes, matrix)))
    rows = [
        [name, str(support[c]), "n/a" if np.isnan(accuracy[c]) else f"{accuracy[c]:.2f}"]
        for c, name in enumerate(views.classes)
    ]
    table(section, ["class", "test images", "top-1 (%)"], rows)
    return section


def _sci(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def export(run_dir: Path) -> Section:
    section = Section("export", "Export parity")
    manifest = read_manifest(run_dir)
    if manifest is None:
        section.missing = "no bundle/manifest.json: run `kt-edge export` first"
        return section
    try:
        load_bundle(RunDir(run_dir).bundle)
        integrity = "every file matches its sha256"
    except BundleError as exc:
        integrity = f"FAILED: {exc}"
    text(
        section,
        f"Bundle {'verified' if manifest.get('verified') else 'NOT verified'} at export; integrity: {integrity}.",
    )
    rows = [
        [
            precision,
            format_value("passed", p["passed"]),
            format_value("samples", p["samples"]),
            format_value("min_cosine", p["min_cosine"]),
            _sci(p["max_abs_err"]),
            format_value("top1", p["reference_top1"]),
            format_value("top1", p["top1"]),
            format_value("drop", p["top1_drop"]),
        ]
        for precision, p in read_parity(run_dir).items()
    ]
    table(
        section,
        [
            "precision",
            "verdict",
            "golden samples",
            "min cosine",
            "max abs err",
            "k-NN top-1 PyTorch",
            "k-NN top-1 export",
            "drop (points)",
        ],
        rows,
    )
    return section


def latency(run_dir: Path) -> Section:
    section = Section("latency", "Latency")
    bench = read_bench(run_dir)
    if not bench:
        section.missing = "no bundle/bench*.json (write one with `kt-edge-runtime bench BUNDLE --json`)"
        return section
    rows = [
        [
            b["backend"],
            b["precision"],
            b["device"],
            str(b["batch"]),
            *(format_value("ms", b[k]) for k in ("p50_ms", "p90_ms", "p99_ms")),
            format_value("ips", b["throughput_ips"]),
        ]
        for b in bench
    ]
    table(section, ["backend", "precision", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s"], rows)
    return section
