"""Feature regression, the simplest distillation baseline: the student regresses the teacher's embedding.

The student's embedding goes through an MLP head to the teacher's dimension; both sides are
L2-normalised and the loss is their squared distance, ||s - t||^2 = 2 - 2 cos(s, t) (the cosine
form, as BYOL's regression loss), averaged over the batch. No queue, so any dataset size works.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kt_edge.data.augment import moco_v2
from kt_edge.engine.method import Needs
from kt_edge.engine.precision import full_precision
from kt_edge.models.backbones import Backbone
from kt_edge.models.frozen import TeacherSpace
from kt_edge.models.heads import projection_head
from kt_edge.transfer.cached_teacher import check_teacher_source, teacher_embedding


class RegressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(default=2048, ge=8)
    teacher_features: Literal["live", "cached"] = Field(
        default="live", description="cached: un-augmented teacher features extracted once (kt-edge features)"
    )
    teacher_space: TeacherSpace = Field(
        default="backbone",
        description="regress the teacher's pooled backbone features (backbone) or its projection-head output (head)",
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.teacher_features == "cached" and self.teacher_space == "head":
            raise ValueError(
                "distill.options.teacher_features cached holds the teacher's backbone features; "
                "use teacher_space backbone, or teacher_features live"
            )
        return self


class Regress(nn.Module):
    """Regression: the student's head output matches the L2-normalised teacher embedding (2 - 2 cos)."""

    Options = RegressOptions

    def __init__(self, student: Backbone, teacher, options: dict, n_images: int):
        super().__init__()
        self.opts = RegressOptions(**options)
        check_teacher_source(teacher, self.opts.teacher_features)
        self.backbone = student
        self.teacher = teacher
        self.head = projection_head(student.embed_dim, self.opts.hidden, teacher.embed_dim)

    @staticmethod
    def needs(options: dict) -> Needs:
        return Needs.FEATURES if options.get("teacher_features") == "cached" else Needs.TEACHER

    @staticmethod
    def train_transform(image_size: int):
        return moco_v2(image_size)

    def training_step(self, batch):
        images, targets = batch  # B x 3 x S x S, and image indices when the teacher is cached
        t = teacher_embedding(self.teacher, images, targets, self.opts.teacher_features)  # t: B x D
        s = self.head(self.backbone(images)).float()  # s: B x D
        loss = regress_loss(s, t)
        return {"loss": loss, "cosine": 1 - loss.detach() / 2}

    def after_step(self, step: int, total: int) -> None:
        """Nothing moves after the optimiser's step: no momentum encoder, no queue."""


@full_precision
def regress_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||s/|s| - t/|t| ||^2, i.e. 2 - 2 cos(s, t); 0 when the directions agree."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    return (s - t).pow(2).sum(dim=1).mean()
