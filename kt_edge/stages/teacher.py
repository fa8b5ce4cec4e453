"""The teacher stage: train teacher.method, or import teacher.checkpoint, into runs/<name>/teacher/."""

from __future__ import annotations

from pathlib import Path

import torch

from kt_edge.engine import distributed
from kt_edge.models.backbones import at_layer, build_backbone
from kt_edge.models.checkpoint import save_backbone
from kt_edge.models.importers import import_teacher
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages.inputs import console, teacher_inputs, training_images
from kt_edge.stages.training import train_stage
from kt_edge.teachers import TEACHERS


def train_teacher(recipe: Recipe, resume: bool = False) -> Path:
    """The teacher (with its projection head where it has one) in runs/<name>/teacher/; rank 0 writes it."""
    out, inputs, cfg = RunDir(recipe.run_dir).teacher, teacher_inputs(recipe), recipe.teacher
    if cfg.checkpoint is not None:
        if distributed.is_main():
            backbone, projection = import_teacher(
                cfg.checkpoint, cfg.arch, recipe.data.image_size, cfg.format, cfg.layer
            )
            save_backbone(backbone, out, projection, stage="teacher", method="imported", source=str(cfg.checkpoint))
            console.print(f"teacher: imported {cfg.checkpoint} -> {out}")
        distributed.barrier()  # the others read the teacher only once it is whole
        return out
    data = training_images(recipe)
    torch.manual_seed(recipe.seed)
    backbone = build_backbone(cfg.arch, recipe.data.image_size)
    method = TEACHERS[cfg.method](backbone, cfg.options, n_images=len(data))
    result = train_stage(recipe, method, data, cfg.train, out, "teacher", resume, inputs)
    if distributed.is_main():
        backbone = at_layer(method.backbone, cfg.layer) if cfg.layer else method.backbone
        projection = None if cfg.layer else getattr(method, "projection", None)  # the head fits the last layer
        save_backbone(
            backbone,
            out,
            projection,
            stage="teacher",
            method=cfg.method,
            steps=result.steps,
            final_loss=result.final_loss,
        )
    distributed.barrier()
    return out
