"""The distill stage: train distill.student from the teacher with distill.method (or alone, the baseline)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from kt_edge.data.sources import Images
from kt_edge.engine import distributed
from kt_edge.engine.device import resolve_device
from kt_edge.engine.method import Needs
from kt_edge.errors import DataError
from kt_edge.features import FeatureStore
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import load_backbone, load_projection, save_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages.inputs import distill_needs, student_inputs, training_images
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


def distill(
    recipe: Recipe,
    teacher_dir: Path | None = None,
    *,
    features: FeatureStore | None = None,
    pseudo_labels: Path | None = None,
    resume: bool = False,
) -> Path:
    """The student of distill.method, given what the method needs (stages.inputs.distill_needs): the
    teacher's folder, and its cached ``features`` of data.train or the cluster stage's
    ``pseudo_labels`` file; nothing for a student trained alone."""
    out, inputs, cfg = RunDir(recipe.run_dir).student, student_inputs(recipe), recipe.distill
    needs, extra = distill_needs(recipe), {}
    device = resolve_device(recipe.device)
    if needs is Needs.NOTHING:
        data, teacher = training_images(recipe), None
    elif needs is Needs.PSEUDO_LABELS:  # the teacher speaks through the labels; it is not run while training
        data, teacher, extra["n_classes"] = pseudo_labelled(recipe, pseudo_labels), None, recipe.cluster.k
    elif needs is Needs.FEATURES:
        data, teacher = training_images(recipe), CachedTeacher(features, device)
        if len(teacher) != len(data):
            raise DataError(
                f"{len(teacher)} cached teacher features for {len(data)} images of data.train: "
                f"delete {features.root} and run again"
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
        # the space distilled, where the teacher network itself is run
        space = {"teacher_space": teacher.space, "teacher_dim": teacher.embed_dim} if needs is Needs.TEACHER else {}
        save_backbone(
            method.backbone,
            out,
            stage="student",
            method=cfg.method,
            teacher=None if needs is Needs.NOTHING else str(teacher_dir),
            **space,
            steps=result.steps,
            final_loss=result.final_loss,
        )
    distributed.barrier()
    return out


def pseudo_labelled(recipe: Recipe, pseudo_labels: Path) -> Images:
    """The cluster stage's pseudo-labels on the images they label, as the method's training set."""
    labels = np.load(pseudo_labels)
    images = training_images(recipe, recipe.cluster.assign_to)
    if len(labels) != len(images):
        raise DataError(
            f"{len(labels)} pseudo-labels for {len(images)} images of {images.name}: "
            f"delete {pseudo_labels.parent} and run again"
        )
    return DISTILLERS[recipe.distill.method].training_set(images, labels, recipe.distill.options)
