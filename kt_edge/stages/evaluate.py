"""The eval stage: every protocol for teacher, student and a random-init student, to eval/results.json."""

from __future__ import annotations

import json

import torch

from kt_edge import atomic
from kt_edge.engine.device import resolve_device
from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import load_backbone, read_sidecar
from kt_edge.recipe import Recipe
from kt_edge.stages.inputs import console, eval_inputs, labelled_splits, prepare


def evaluate(recipe: Recipe) -> dict:
    """Every eval protocol for the teacher, the student and (as the floor) a random-init student, plus transfer;
    written to eval/results.json as {model: {metric: value}}."""
    from kt_edge.evaluate.protocols import evaluate_model, evaluate_transfer, transfer_splits

    run = prepare(recipe)
    results_path, stamp = run.results, run.eval / "inputs.txt"
    inputs = eval_inputs(recipe)
    if results_path.is_file() and stamp.is_file() and stamp.read_text() == inputs:
        console.print(f"eval: up to date in {results_path}")
        return json.loads(results_path.read_text())
    stamp.unlink(missing_ok=True)  # it must never vouch for results of other inputs
    train_set, test_set = labelled_splits(recipe)
    device = resolve_device(recipe.device)
    models = {}
    for name, folder in (("teacher", run.teacher), ("student", run.student)):
        if (name != "teacher" or recipe.eval.teacher) and read_sidecar(folder) is not None:
            models[name] = load_backbone(folder)[0]
    if recipe.eval.baseline:
        torch.manual_seed(recipe.seed)
        models["random_init"] = build_backbone(recipe.distill.student, recipe.data.image_size)
    if not models:
        raise CheckpointError(f"nothing to evaluate in {run.root}: train a teacher or a student first")
    transfer = transfer_splits(recipe.eval, recipe.data.image_size, recipe.seed)
    results = {}
    for name, model in models.items():
        results[name] = evaluate_model(
            model, train_set, test_set, recipe.eval, recipe.seed, device, recipe.data.workers
        ).metrics
        results[name].update(
            evaluate_transfer(
                model, recipe.eval, recipe.data.image_size, recipe.seed, device, recipe.data.workers, splits=transfer
            )
        )
        console.print(f"eval: {name} " + ", ".join(f"{metric} {value:.2f}" for metric, value in results[name].items()))
    atomic.write_json(results_path, results)
    atomic.write_text(stamp, inputs)  # last: it vouches for the results beside it
    return results
