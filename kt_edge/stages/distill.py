"""The distill stage: train distill.student from the teacher with distill.method (or alone, the baseline)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from kt_edge.engine import distributed
from kt_edge.engine.device import resolve_device
from kt_edge.engine.method import Needs
from kt_edge.errors import CheckpointError, DataError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import load_backbone, load_projection, save_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.recipe import Recipe
from kt_edge.stages.cluster import pseudo_labelled
from kt_edge.stages.features import features_stage
from kt_edge.stages.inputs import (
    console,
    distill_needs,
    prepare,
    student_inputs,
    teacher_inputs,
    training_images,
    up_to_date,
)
from kt_edge.stages.training import train_stage
from kt_edge.teachers import TEACHERS
from kt_edge.transfer import DISTILLERS
from kt_edge.transfer.cached_teacher import CachedTeacher

log = logging.getLogger(__name__)


def frozen_teacher(teacher_dir: Path, space: str, device: torch.device) -> FrozenTeacher:
    """The run's teacher in the space the method distils: its projection head's output, or its backbone's."""
    projection = load_projection(teacher_dir) if space == "head" else None
    if space == "head" and projection is None:
        log.warning(
            "teacher_space head: the teacher in %s has no projection head (a pretext method, an imported "
            "classifier, or features below its last layer); distilling its backbone features",
            teacher_dir,
        )
    return FrozenTeacher(load_backbone(teacher_dir)[0], device, projection)


def distill(recipe: Recipe, resume: bool = False) -> Path:
    run = prepare(recipe)
    out = run.student
    inputs = student_inputs(recipe)
    if up_to_date(out, inputs):
        console.print(f"student: up to date in {out}")
        return out
    teacher_dir = run.teacher
    cfg = recipe.distill
    needs, extra = distill_needs(recipe), {}
    if needs is not Needs.NOTHING and not up_to_date(teacher_dir, teacher_inputs(recipe)):
        raise CheckpointError(f"no teacher for this recipe in {teacher_dir}: run `kt-edge train-teacher` first")
    device = resolve_device(recipe.device)
    if needs is Needs.NOTHING:
        data, teacher = training_images(recipe), None
    elif needs is Needs.PSEUDO_LABELS:  # the teacher speaks through the labels; it is not run while training
        data, teacher, extra["n_classes"] = pseudo_labelled(recipe), None, recipe.cluster.k
    elif needs is Needs.FEATURES:
        data = training_images(recipe)
        teacher = CachedTeacher(features_stage(recipe, "train"), device)
        if len(teacher) != len(data):
            raise DataError(
                f"{len(teacher)} cached teacher features for {len(data)} images of data.train: "
                f"delete {run.features('train')} and run again"
            )
        data = data.with_labels(np.arange(len(data)))
    else:
        data = training_images(recipe)
        teacher = frozen_teacher(teacher_dir, cfg.options.get("teacher_space", "backbone"), device)
    torch.manual_seed(recipe.seed)
    student = build_backbone(cfg.student, recipe.data.image_size)
    if needs is Needs.NOTHING:
        method = TEACHERS[cfg.method](student, cfg.options, n_images=len(data))
    else:
        method = DISTILLERS[cfg.method](student, teacher, cfg.options, n_images=len(data), **extra)
    result = train_stage(recipe, method, data, cfg.train, out, "distill", resume, inputs)
    if distributed.is_main():
        space = (
            {"teacher_space": teacher.space, "teacher_dim": teacher.embed_dim}
            if isinstance(teacher, FrozenTeacher)
            else {}
        )
        save_backbone(
            method.backbone,
            out,
            stage="student",
            method=cfg.method,
            teacher=None if needs is Needs.NOTHING else str(teacher_dir),
            **space,
            inputs=inputs,
            steps=result.steps,
            final_loss=result.final_loss,
        )
    distributed.barrier()
    return out
