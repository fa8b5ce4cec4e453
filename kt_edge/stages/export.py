"""The export stage: the student's device bundle, checked against PyTorch."""

from __future__ import annotations

import json

from kt_edge.errors import CheckpointError
from kt_edge.models.checkpoint import read_sidecar
from kt_edge.recipe import Recipe
from kt_edge.stages.inputs import labelled_splits, prepare


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
