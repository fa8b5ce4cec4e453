"""Training a stage (teacher or student) on the recipe's data path, with its resume fingerprint."""

from __future__ import annotations

from pathlib import Path

from kt_edge.data.feed import resolve_augment
from kt_edge.data.sources import Images
from kt_edge.engine.device import resolve_device
from kt_edge.engine.method import Method
from kt_edge.engine.trainer import TrainResult, train
from kt_edge.recipe import Recipe, TrainConfig
from kt_edge.run_dir import RunDir


def train_stage(
    recipe: Recipe,
    method: Method,
    data: Images,
    cfg: TrainConfig,
    out: Path,
    stage: str,
    resume: bool,
    inputs: str,
) -> TrainResult:
    """Train ``method`` on ``data`` per ``cfg`` (the teacher's or the distill section's) into ``out``; the
    resume point is tied to the stage's ``inputs`` and to the data path (cache, batched augmentation)."""
    device = resolve_device(recipe.device)
    augment = resolve_augment(
        recipe.data.augment, data, recipe.data.image_size, device, method.train_transform(recipe.data.image_size)
    )
    path = ("cache+" if recipe.data.cache else "") + augment
    return train(
        method,
        data,
        cfg,
        out,
        stage=stage,
        seed=recipe.seed,
        device=device,
        image_size=recipe.data.image_size,
        workers=recipe.data.workers,
        resume=resume,
        fingerprint=inputs if path == "per_sample" else f"{inputs}+{path}",  # a resume keeps its data path
        metrics_path=RunDir(recipe.run_dir).metrics,
        augment=augment,
    )
