"""One self-contained HTML report of a run (images inlined), and a markdown summary beside it.

Needs only the run directory and the data its recipe names: training curves come from
``metrics.jsonl``, the evaluation table from ``eval/results.json``, export parity and latency from
``bundle/``; the 2-D map and the per-class k-NN view are recomputed on the CPU from the saved
teacher and student on a capped, seeded part of the data. A stage that is absent is reported as
missing, never as a crash.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kt_edge_runtime.bundle import BundleError, load_bundle
from matplotlib import colormaps
from matplotlib.figure import Figure
from pydantic import ValidationError
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix

from kt_edge import atomic
from kt_edge.data.labelled import labelled_pair
from kt_edge.engine.metrics import read_records
from kt_edge.errors import DataError, KtEdgeError
from kt_edge.evaluate.compare import (
    describe,
    format_value,
    markdown_table,
    read_bench,
    read_manifest,
    read_parity,
    read_recipe,
    read_results,
)
from kt_edge.evaluate.knn import KnnSetting, l2_normalize
from kt_edge.evaluate.protocols import Evaluation, evaluate_model_detailed
from kt_edge.models.checkpoint import load_backbone
from kt_edge.recipe import DataConfig, EvalConfig, KnnConfig
from kt_edge.run_dir import RunDir

MAP_PCA_DIMS = 50  # t-SNE on a PCA projection, the usual speed-up that keeps neighbourhoods


@dataclass
class Section:
    """One part of the report in both formats; ``missing`` replaces the body when it could not be made."""

    key: str
    title: str
    html: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)
    missing: str | None = None


def _png(fig: Figure) -> str:
    """An <img> with the figure inlined as a base64 PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table(section: Section, header: list[str], rows: list[list[str]]) -> None:
    section.html.append(_html_table(header, rows))
    section.md.append(markdown_table(header, rows))


def _text(section: Section, text: str) -> None:
    section.html.append(f"<p>{html.escape(text)}</p>")
    section.md.append(text + "\n")


# --------------------------------------------------------------------------- training curves


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


def _training(run_dir: Path) -> Section:
    section = Section("training", "Training curves")
    path = RunDir(run_dir).metrics
    if not path.is_file():
        section.missing = "no metrics.jsonl: no stage was trained in this run"
        return section
    curves = read_curves(path)
    if not curves:
        section.missing = "metrics.jsonl holds no training steps"
        return section
    with_lr = any("lr" in r for records in curves.values() for r in records)
    fig = Figure(figsize=(5 * len(curves), 5.5 if with_lr else 3.4), layout="constrained")
    grid = fig.subplots(2 if with_lr else 1, len(curves), squeeze=False, sharex="col")
    for i, (stage, records) in enumerate(curves.items()):
        steps = np.array([r["step"] for r in records])
        loss = np.array([r.get("loss", np.nan) for r in records], dtype=float)
        ax = grid[0, i]
        ax.plot(steps, loss, color="tab:blue", alpha=0.35 if len(loss) >= 100 else 1.0, lw=1)
        if len(loss) >= 100:  # a running mean over 2% of the steps shows the trend through batch noise
            window = len(loss) // 50
            ax.plot(steps[window - 1 :], np.convolve(loss, np.ones(window) / window, "valid"), color="tab:blue")
        ax.set(title=stage, ylabel="loss")
        if with_lr:
            grid[1, i].plot(steps, [r.get("lr", np.nan) for r in records], color="tab:gray")
            grid[1, i].set(ylabel="learning rate")
        grid[-1, i].set(xlabel="step")
    section.html.append(_png(fig))
    rows = [[stage, str(len(r)), _loss(r[0]), _loss(r[-1])] for stage, r in curves.items()]
    _table(section, ["stage", "steps", "first loss", "last loss"], rows)
    return section


# --------------------------------------------------------------------------- evaluation table


def _evaluation(run_dir: Path) -> Section:
    section = Section("evaluation", "Evaluation")
    results = read_results(run_dir)
    if not results:
        section.missing = "no eval/results.json: run `kt-edge eval` first"
        return section
    models = list(results)
    metrics = list(dict.fromkeys(name for m in models for name in results[m]))
    rows = [[name, *(format_value(name, results[m].get(name)) for m in models)] for name in metrics]
    _table(section, ["metric", *(m.replace("_", "-") for m in models)], rows)
    _text(
        section, "Accuracies in percent; NMI and ARI in 0..1; metrics prefixed transfer_ are on the transfer dataset."
    )
    return section


# --------------------------------------------------------------------------- recomputed views


@dataclass
class Recomputed:
    """Embedding-based views of the saved models on a capped part of the recipe's data."""

    classes: list[str]
    bank_size: int
    test_size: int
    setting: KnnSetting
    evaluations: dict[str, Evaluation]  # teacher / student, each with its map sample
    knn_error: str | None  # why the student's k-NN could not run


def _recompute(
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
                evaluations[stage] = evaluate_model_detailed(
                    model, bank, test, knn_only, seed, device, map_points=map_points
                )
                knn_error = None
                continue
            except DataError as exc:
                knn_error = str(exc)
        evaluations[stage] = evaluate_model_detailed(model, bank, test, map_only, seed, device, map_points=map_points)
    return Recomputed(bank.classes, len(bank), len(test), KnnSetting(first.k, first.t), evaluations, knn_error)


def _class_colors(n: int) -> np.ndarray:
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return cmap(np.arange(n) % 20 if n <= 20 else np.linspace(0, 1, n))


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of L2-normalised features (through PCA to 50 dims first when wider)."""
    x = l2_normalize(features)
    if x.shape[1] > MAP_PCA_DIMS and len(x) > MAP_PCA_DIMS:
        x = PCA(MAP_PCA_DIMS, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (len(x) - 1) / 3.0))
    return TSNE(2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed).fit_transform(x)


def _map(views: Recomputed | str, seed: int, map_points: int) -> Section:
    section = Section("map", "2-D map of the test split (t-SNE)")
    if isinstance(views, str) or map_points == 0:
        section.missing = views if isinstance(views, str) else "map not asked for (map_points=0)"
        return section
    shown = {m: e for m, e in views.evaluations.items() if e.map_features is not None and len(e.map_features) >= 4}
    if not shown:
        section.missing = "no teacher or student checkpoint to embed"
        return section
    colors = _class_colors(len(views.classes))
    fig = Figure(figsize=(5.2 * len(shown) + 1.8, 5))
    for i, (model, evaluation) in enumerate(shown.items()):
        ax = fig.add_subplot(1, len(shown), i + 1)
        points = tsne_2d(evaluation.map_features, seed)
        for c, name in enumerate(views.classes):
            mine = evaluation.map_labels == c
            ax.scatter(points[mine, 0], points[mine, 1], s=6, color=colors[c], label=name)
        ax.set(title=f"{model} ({len(points)} test images)", xticks=[], yticks=[])
    if len(views.classes) <= 20:  # beyond that a legend hides more than it tells
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", markerscale=2.5, fontsize=8)
        fig.subplots_adjust(right=1 - 1.6 / fig.get_figwidth())
    section.html.append(_png(fig))
    missing = [m for m in ("teacher", "student") if m not in shown]
    _text(section, "Coloured by true class." + (f" Missing: {', '.join(missing)} (no checkpoint)." if missing else ""))
    return section


LABELLED_CLASSES = 40  # above this many classes, figures drop per-class tick labels


def _accuracy_figure(classes: list[str], accuracy: np.ndarray, overall: float) -> Figure:
    """One bar per class, or for many classes their accuracies sorted into one curve."""
    n = len(classes)
    fig = Figure(figsize=(6, min(0.28 * n, 12) + 1.2) if n <= LABELLED_CLASSES else (6, 3.5))
    ax = fig.add_subplot()
    if n <= LABELLED_CLASSES:
        ax.barh(np.arange(n), np.nan_to_num(accuracy), color=_class_colors(n))
        ax.set(yticks=np.arange(n), yticklabels=classes, xlim=(0, 100), xlabel="top-1 (%)")
        ax.invert_yaxis()
        ax.axvline(overall, color="k", ls=":", lw=1)
    else:
        ax.plot(np.sort(accuracy[~np.isnan(accuracy)])[::-1])
        ax.set(xlabel="classes, best first", ylabel="top-1 (%)", ylim=(0, 100))
        ax.axhline(overall, color="k", ls=":", lw=1)
    return fig


def _confusion_figure(classes: list[str], matrix: np.ndarray) -> Figure:
    """Row-normalised confusion matrix; counts written in the cells when there are few classes."""
    n = len(classes)
    side = min(0.45 * n, 12)
    fig = Figure(figsize=(side + 2.5, side + 2))
    ax = fig.add_subplot()
    rates = matrix / np.maximum(matrix.sum(axis=1), 1)[:, None]
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    if n <= LABELLED_CLASSES:
        ax.set(xticks=np.arange(n), yticks=np.arange(n))
        ax.set_xticklabels(classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
    if n <= 20:
        for (r, c), count in np.ndenumerate(matrix):
            ax.text(
                c, r, str(count), ha="center", va="center", fontsize=7, color="white" if rates[r, c] > 0.5 else "black"
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig


def _per_class(views: Recomputed | str) -> Section:
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
    _text(
        section,
        f"k-NN (k={views.setting.k}, T={views.setting.t:g}) with a bank of {views.bank_size} train "
        f"images, scored on {views.test_size} test images: top-1 {overall:.2f}%.",
    )

    section.html.append(_png(_accuracy_figure(views.classes, accuracy, overall)))
    section.html.append(_png(_confusion_figure(views.classes, matrix)))
    rows = [
        [name, str(support[c]), "n/a" if np.isnan(accuracy[c]) else f"{accuracy[c]:.2f}"]
        for c, name in enumerate(views.classes)
    ]
    _table(section, ["class", "test images", "top-1 (%)"], rows)
    return section


# --------------------------------------------------------------------------- export


def _sci(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _export(run_dir: Path) -> Section:
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
    _text(
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
    _table(
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


def _latency(run_dir: Path) -> Section:
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
    _table(section, ["backend", "precision", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "images/s"], rows)
    return section


# --------------------------------------------------------------------------- assembly


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}img{max-width:100%}
.missing{color:#a33;font-style:italic}section{margin-bottom:2em}"""


def _summary(run_dir: Path, recipe: dict) -> Section:
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
    _table(section, ["", ""], rows)
    return section


def _render_html(name: str, created: str, sections: list[Section]) -> str:
    parts = [
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>kt-edge report: {html.escape(name)}</title>',
        f"<style>{CSS}</style></head><body><h1>kt-edge report: {html.escape(name)}</h1>",
        f"<p>Generated {html.escape(created)}.</p>",
    ]
    for s in sections:
        body = f'<p class="missing">missing: {html.escape(s.missing)}</p>' if s.missing else "\n".join(s.html)
        parts.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>\n{body}\n</section>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _render_md(name: str, created: str, sections: list[Section]) -> str:
    parts = [f"# kt-edge report: {name}\n", f"Generated {created}; figures are in report.html.\n"]
    for s in sections:
        parts.append(f"## {s.title}\n")
        parts.extend([f"_missing: {s.missing}_\n"] if s.missing else s.md)
    return "\n".join(parts)


def write_report(
    run_dir: Path | str,
    *,
    map_points: int = 1000,
    max_bank: int = 5000,
    max_test: int = 1000,
    device: str = "cpu",
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into the run directory and return their paths.

    ``max_bank`` / ``max_test`` cap the seeded parts of the recipe's train / test splits embedded
    again for the map and the per-class view; ``map_points`` caps the points of each map.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    if map_points < 0 or max_bank < 1 or max_test < 1:
        raise ValueError(f"need map_points >= 0 and max_bank, max_test >= 1, got {map_points}, {max_bank}, {max_test}")
    recipe = read_recipe(run_dir)
    seed = recipe.get("seed", 0) if isinstance(recipe.get("seed", 0), int) else 0
    views = (
        _recompute(run_dir, recipe, seed, max_bank, max_test, map_points, device)
        if recipe
        else "no recipe.yaml in the run directory"
    )
    sections = [
        _summary(run_dir, recipe),
        _training(run_dir),
        _evaluation(run_dir),
        _map(views, seed, map_points),
        _per_class(views),
        _export(run_dir),
        _latency(run_dir),
    ]
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    html_path, md_path = RunDir(run_dir).report_html, RunDir(run_dir).report_md
    atomic.write_text(html_path, _render_html(run_dir.name, created, sections))
    atomic.write_text(md_path, _render_md(run_dir.name, created, sections))
    return html_path, md_path
