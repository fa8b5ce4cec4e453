"""The stages of a run, each reading the previous stage's artifact from the run directory.

``runs/<name>/``: ``recipe.yaml`` (resolved), ``metrics.jsonl``, ``teacher/``, ``student/``
(safetensors + JSON sidecar, ``resume.pt``), ``eval/results.json``, ``bundle/``.  A stage whose
output exists for the same inputs is skipped; a partial one is redone, or resumed with ``resume``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kt_edge import atomic
from kt_edge.data.augment import eval_transform
from kt_edge.data.sources import Images, open_source
from kt_edge.engine.trainer import resolve_device, train
from kt_edge.errors import CheckpointError, DataError
from kt_edge.features import embed
from kt_edge.evaluate.knn import KnnSetting, knn_accuracy
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import load_backbone, read_sidecar, save_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.models.importers import import_teacher
from kt_edge.recipe import Recipe
from kt_edge.teachers import TEACHERS
from kt_edge.transfer import DISTILLERS

console = Console(stderr=True)


def prepare(recipe: Recipe) -> Path:
    """Create the run directory and record the resolved recipe in it."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    return run_dir


def _up_to_date(folder: Path, inputs: str) -> bool:
    card = read_sidecar(folder)
    return card is not None and card.get("inputs") == inputs


def teacher_inputs(recipe: Recipe) -> str:
    return recipe.digest("seed", "data.train", "data.image_size", "teacher")


def student_inputs(recipe: Recipe) -> str:
    return recipe.digest("seed", "data.train", "data.image_size", "teacher", "distill")


def train_teacher(recipe: Recipe, resume: bool = False) -> Path:
    out = prepare(recipe) / "teacher"
    inputs = teacher_inputs(recipe)
    if _up_to_date(out, inputs):
        console.print(f"teacher: up to date in {out}")
        return out
    cfg = recipe.teacher
    if cfg.checkpoint is not None:
        backbone = import_teacher(cfg.checkpoint, cfg.arch, recipe.data.image_size)
        save_backbone(backbone, out, stage="teacher", method="imported", source=str(cfg.checkpoint), inputs=inputs)
        console.print(f"teacher: imported {cfg.checkpoint} -> {out}")
        return out
    data = open_source(recipe.data.train, recipe.seed)
    torch.manual_seed(recipe.seed)
    backbone = build_backbone(cfg.arch, recipe.data.image_size)
    method = TEACHERS[cfg.method](backbone, cfg.options, n_images=len(data))
    result = _train(recipe, method, data, cfg.train, out, "teacher", resume, inputs)
    save_backbone(method.backbone, out, stage="teacher", method=cfg.method, inputs=inputs,
                  steps=result.steps, final_loss=result.final_loss)
    return out


def distill(recipe: Recipe, resume: bool = False) -> Path:
    run_dir = prepare(recipe)
    out = run_dir / "student"
    inputs = student_inputs(recipe)
    if _up_to_date(out, inputs):
        console.print(f"student: up to date in {out}")
        return out
    teacher_dir = run_dir / "teacher"
    if not _up_to_date(teacher_dir, teacher_inputs(recipe)):
        raise CheckpointError(f"no teacher for this recipe in {teacher_dir}: run `kt-edge train-teacher` first")
    device = resolve_device(recipe.device)
    teacher, _ = load_backbone(teacher_dir)
    cfg = recipe.distill
    data = open_source(recipe.data.train, recipe.seed)
    torch.manual_seed(recipe.seed)
    student = build_backbone(cfg.student, recipe.data.image_size)
    method = DISTILLERS[cfg.method](student, FrozenTeacher(teacher, device), cfg.options, n_images=len(data))
    result = _train(recipe, method, data, cfg.train, out, "distill", resume, inputs)
    save_backbone(method.backbone, out, stage="student", method=cfg.method, teacher=str(teacher_dir),
                  inputs=inputs, steps=result.steps, final_loss=result.final_loss)
    return out


def _train(recipe, method, data, cfg, out, stage, resume, inputs):
    return train(method, data, cfg, out, stage=stage, seed=recipe.seed, device=resolve_device(recipe.device),
                 image_size=recipe.data.image_size, workers=recipe.data.workers, resume=resume,
                 fingerprint=inputs, metrics_path=recipe.run_dir / "metrics.jsonl")


def labelled_splits(recipe: Recipe) -> tuple[Images, Images]:
    """The k-NN bank (train split) and the scored split, both labelled and with the same classes."""
    if recipe.data.test is None:
        raise DataError("evaluation needs a labelled split: set data.test in the recipe")
    train_set = open_source(recipe.data.train, recipe.seed)
    test_set = open_source(recipe.data.test, recipe.seed)
    for split in (train_set, test_set):
        if not split.labelled:
            raise DataError(f"{split.name}: evaluation needs labels (an ImageFolder tree or CIFAR-10 pickles)")
    if train_set.classes != test_set.classes:
        raise DataError(f"classes differ between {train_set.name} ({len(train_set.classes)}) and "
                        f"{test_set.name} ({len(test_set.classes)})")
    transform = eval_transform(recipe.data.image_size)
    return train_set.with_transform(transform), test_set.with_transform(transform)


def evaluate(recipe: Recipe) -> dict:
    """k-NN of the teacher, the student and (as the floor) a random-init student; written to eval/results.json."""
    run_dir = prepare(recipe)
    train_set, test_set = labelled_splits(recipe)
    settings = [KnnSetting(k.k, k.t) for k in recipe.eval.knn]
    device = resolve_device(recipe.device)
    models = {}
    for name, folder in (("teacher", run_dir / "teacher"), ("student", run_dir / "student")):
        if read_sidecar(folder) is not None:
            models[name] = load_backbone(folder)[0]
    if not models:
        raise CheckpointError(f"nothing to evaluate in {run_dir}: train a teacher or a student first")
    if recipe.eval.baseline:
        torch.manual_seed(recipe.seed)
        models["random_init"] = build_backbone(recipe.distill.student, recipe.data.image_size)
    results = {}
    for name, model in models.items():
        bank, bank_labels = embed(model, train_set, device=device, workers=recipe.data.workers, progress=False)
        feats, labels = embed(model, test_set, device=device, workers=recipe.data.workers, progress=False)
        results[name] = knn_accuracy(bank, bank_labels, feats, labels, settings)
        console.print(f"eval: {name} " + ", ".join(f"k-NN(k={r['k']}, T={r['t']}) {r['top1']:.2f}%"
                                                     for r in results[name]))
    atomic.write_json(run_dir / "eval" / "results.json", results)
    return results


def export(recipe: Recipe) -> dict:
    from kt_edge.export.bundle import build_bundle

    run_dir = prepare(recipe)
    student_dir = run_dir / "student"
    card = read_sidecar(student_dir)
    if card is None:
        raise CheckpointError(f"no student in {student_dir}: run `kt-edge distill` first")
    train_set, test_set = labelled_splits(recipe)
    provenance = {"recipe": recipe.digest(), "teacher": recipe.teacher.method, "teacher_arch": recipe.teacher.arch,
                  "method": recipe.distill.method, "student": card["arch"]}
    results_path = run_dir / "eval" / "results.json"
    if results_path.is_file():
        provenance["metrics"] = json.loads(results_path.read_text())
    return build_bundle(student_dir, run_dir / "bundle", train_set, test_set, recipe.export, recipe.seed, provenance)


def run_all(recipe: Recipe, resume: bool = False) -> None:
    """teacher -> distill -> eval -> export, then the summary table."""
    train_teacher(recipe, resume)
    distill(recipe, resume)
    results = evaluate(recipe)
    report = export(recipe)
    table = Table(title=f"kt-edge run {recipe.name}")
    table.add_column("model")
    for setting in recipe.eval.knn:
        table.add_column(f"k-NN top-1 (k={setting.k}, T={setting.t})", justify="right")
    for name, rows in results.items():
        table.add_row(name.replace("_", "-"), *(f"{row['top1']:.2f}%" for row in rows))
    Console().print(table)
    parity = Table(title="export parity (ONNX Runtime vs PyTorch fp32)")
    for column in ("precision", "golden", "min cosine", "k-NN top-1 drop", "verdict"):
        parity.add_column(column)
    for precision, res in report["results"].items():
        parity.add_row(precision, f"{res['golden']['samples']} samples", f"{res['golden']['min_cosine']:.6f}",
                       f"{res['accuracy']['drop']:+.2f}", "PASS" if res["passed"] else "FAIL")
    Console().print(parity)
    Console().print(f"bundle: {report['bundle']}")
