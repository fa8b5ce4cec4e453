"""The export stage: the student's device bundle, checked against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

from kt_edge import atomic
from kt_edge.models.checkpoint import read_sidecar
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages.inputs import labelled_splits


def export(recipe: Recipe, student_dir: Path) -> dict:
    """The bundle of the student in ``student_dir``, carrying the run's evaluation results where there are
    some; raises ParityError (the bundle written, not verified) when an exported model misses PyTorch."""
    from kt_edge.export.bundle import build_bundle

    run, card = RunDir(recipe.run_dir), read_sidecar(student_dir)
    for folder in (run.bundle, run.bundle / "golden"):
        atomic.remove_temps(folder)  # what a killed export was writing
    train_set, test_set = labelled_splits(recipe)
    provenance = {
        "recipe": recipe.digest(),
        "teacher": recipe.teacher.method,
        "teacher_arch": recipe.teacher.arch,
        "method": recipe.distill.method,
        "student": card["arch"],
        **{key: card[key] for key in ("teacher_space", "teacher_dim") if key in card},
    }  # what was distilled
    if run.results.is_file():
        provenance["metrics"] = json.loads(run.results.read_text())
    return build_bundle(student_dir, run.bundle, train_set, test_set, recipe.export, recipe.seed, provenance)
