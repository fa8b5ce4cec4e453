"""The export stage: the student's device bundle, checked against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

from kt_edge_runtime.bundle import BundleError, Manifest, load_bundle

from kt_edge import atomic
from kt_edge.errors import CheckpointError
from kt_edge.models.checkpoint import read_sidecar
from kt_edge.recipe import Recipe
from kt_edge.stages.inputs import console, export_inputs, labelled_splits, prepare


def export(recipe: Recipe) -> dict:
    from kt_edge.export.bundle import build_bundle

    run = prepare(recipe)
    student_dir = run.student
    card = read_sidecar(student_dir)
    if card is None:
        raise CheckpointError(f"no student in {student_dir}: run `kt-edge distill` first")
    bundle_dir, inputs = run.bundle, export_inputs(recipe)
    for folder in (bundle_dir, bundle_dir / "golden"):
        atomic.remove_temps(folder)  # what a killed export was writing
    done = _verified_bundle(bundle_dir)
    if done is not None and done.provenance.get("inputs") == inputs:
        console.print(f"export: up to date in {bundle_dir}")
        return {"bundle": str(bundle_dir), "results": done.parity.results}
    train_set, test_set = labelled_splits(recipe)
    provenance = {
        "recipe": recipe.digest(),
        "inputs": inputs,
        "teacher": recipe.teacher.method,
        "teacher_arch": recipe.teacher.arch,
        "method": recipe.distill.method,
        "student": card["arch"],
        **{key: card[key] for key in ("teacher_space", "teacher_dim") if key in card},
    }  # what was distilled
    results_path = run.results
    if results_path.is_file():
        provenance["metrics"] = json.loads(results_path.read_text())
    return build_bundle(student_dir, bundle_dir, train_set, test_set, recipe.export, recipe.seed, provenance)


def _verified_bundle(bundle_dir: Path) -> Manifest | None:
    """The bundle's manifest if the bundle is whole (every sha256 checked) and passed parity, else None."""
    try:
        manifest = load_bundle(bundle_dir)
    except BundleError:
        return None
    return manifest if manifest.verified else None
