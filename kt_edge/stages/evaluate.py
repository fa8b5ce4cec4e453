"""The eval stage: every protocol for teacher, student and a random-init student, to eval/results.json."""

from __future__ import annotations

from pathlib import Path

import torch

from kt_edge import atomic
from kt_edge.engine.device import resolve_device
from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import load_backbone
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages.inputs import console, labelled_splits


def evaluate(recipe: Recipe, models: dict[str, Path]) -> dict:
    """Every eval protocol for the finished ``models`` (name: folder) and, as the floor, a random-init student,
    plus transfer; written to eval/results.json as {model: {metric: value}}."""
    from kt_edge.evaluate.protocols import evaluate_model, evaluate_transfer, transfer_splits

    train_set, test_set = labelled_splits(recipe)
    device = resolve_device(recipe.device)
    networks = {name: load_backbone(folder)[0] for name, folder in models.items()}
    if recipe.eval.baseline:
        torch.manual_seed(recipe.seed)
        networks["random_init"] = build_backbone(recipe.distill.student, recipe.data.image_size)
    if not networks:
        raise CheckpointError(f"nothing to evaluate in {recipe.run_dir}: train a teacher or a student first")
    transfer = transfer_splits(recipe.eval, recipe.data.image_size, recipe.seed)
    results = {}
    for name, model in networks.items():
        results[name] = evaluate_model(
            model, train_set, test_set, recipe.eval, recipe.seed, device, recipe.data.workers
        ).metrics
        results[name].update(
            evaluate_transfer(
                model, recipe.eval, recipe.data.image_size, recipe.seed, device, recipe.data.workers, splits=transfer
            )
        )
        console.print(f"eval: {name} " + ", ".join(f"{metric} {value:.2f}" for metric, value in results[name].items()))
    atomic.write_json(RunDir(recipe.run_dir).results, results)
    return results
