"""CompRess (Koohpayegani et al., NeurIPS 2020): the student mimics the teacher's similarities to anchors.

Teacher and student embeddings are L2-normalised and compared with a memory bank of anchor
embeddings; both similarity vectors are divided by a temperature (T = 0.04) and the loss is
KL(teacher || student), averaged over the batch. The banks are updated FIFO after the loss and
the current batch is never its own anchor (no self-positive), as in the official code.

- ``1q``: one bank of teacher embeddings; the student is mapped to the teacher's dimension by a
  linear layer and compared with the same anchors.
- ``2q``: the teacher bank for the teacher, and a second bank filled with the embeddings of a
  momentum (EMA, alpha 0.999) copy of the student for the student.

kt-edge's default puts a linear projection (``dim``) on the student and trains on MoCo v2 views. The
official 2q setting (UMBCvision/CompRess ``train_student.py``) is ``student_head: none`` (the student's
raw pooled features fill its bank, no extra layer; the teacher's raw backbone features, its fc removed,
fill the teacher's) and ``augment: crop_flip`` (random resized crop and flip only).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kt_edge.data.augment import crop_flip, moco_v2
from kt_edge.engine.ema import ema_update
from kt_edge.engine.method import Needs
from kt_edge.engine.precision import full_precision
from kt_edge.engine.queue import FeatureQueue, check_queue_size, queue_field
from kt_edge.models.backbones import Backbone
from kt_edge.models.frozen import TeacherSpace
from kt_edge.transfer.cached_teacher import check_teacher_source, teacher_embedding


class CompressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Literal["1q", "2q"] = "2q"
    bank: int = queue_field(128000, "anchors per bank; a multiple of the batch, smaller than the dataset")
    tau_teacher: float = Field(default=0.04, gt=0)
    tau_student: float = Field(default=0.04, gt=0)
    dim: int = Field(default=128, ge=8, description="2q: the student's linear projection size")
    momentum: float = Field(default=0.999, ge=0, lt=1, description="2q: EMA of the student that fills its bank")
    teacher_features: Literal["live", "cached"] = Field(
        default="live", description="cached: un-augmented teacher features extracted once (kt-edge features)"
    )
    teacher_space: TeacherSpace = Field(
        default="backbone",
        description="the teacher's pooled backbone features "
        "(backbone, as the official code) or its projection-head output (head)",
    )
    student_head: Literal["linear", "none"] = Field(
        default="linear",
        description="2q: a linear projection to dim on the student, or none (the official "
        "setting: the student's raw features)",
    )
    augment: Literal["moco_v2", "crop_flip"] = Field(
        default="moco_v2", description="training views: MoCo v2's, or random resized crop and flip (official)"
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.variant == "1q" and self.student_head == "none":
            raise ValueError(
                "distill.options.student_head none needs variant 2q: 1q compares the student with "
                "the teacher's bank, so a linear layer must map it to the teacher's dimension"
            )
        if self.teacher_features == "cached" and self.teacher_space == "head":
            raise ValueError(
                "distill.options.teacher_features cached holds the teacher's backbone features; "
                "use teacher_space backbone, or teacher_features live"
            )
        return self


class Compress(nn.Module):
    """CompRess: KL between teacher and student similarities to a memory bank of anchors (1q or 2q)."""

    Options = CompressOptions

    def __init__(self, student: Backbone, teacher, options: dict, n_images: int):
        super().__init__()
        self.opts = CompressOptions(**options)
        check_queue_size("distill.options.bank", self.opts.bank, n_images)
        check_teacher_source(teacher, self.opts.teacher_features)
        self.backbone = student
        self.teacher = teacher
        self.teacher_bank = FeatureQueue(self.opts.bank, teacher.embed_dim)
        if self.opts.variant == "1q":
            self.head = nn.Linear(student.embed_dim, teacher.embed_dim)
        else:
            raw = self.opts.student_head == "none"
            self.head = nn.Identity() if raw else nn.Linear(student.embed_dim, self.opts.dim)
            self.momentum_backbone = copy.deepcopy(student).requires_grad_(False)
            self.momentum_head = copy.deepcopy(self.head).requires_grad_(False)
            self.student_bank = FeatureQueue(self.opts.bank, student.embed_dim if raw else self.opts.dim)
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @staticmethod
    def needs(options: dict) -> Needs:
        return Needs.FEATURES if options.get("teacher_features") == "cached" else Needs.TEACHER

    def train_transform(self, image_size: int):
        return moco_v2(image_size) if self.opts.augment == "moco_v2" else crop_flip(image_size)

    def training_step(self, batch):
        images, targets = batch  # B x 3 x S x S, and image indices when the teacher is cached
        t = F.normalize(teacher_embedding(self.teacher, images, targets, self.opts.teacher_features), dim=1)  # B x Dt
        s = F.normalize(self.head(self.backbone(images)).float(), dim=1)  # s: B x Ds (Dt for 1q)
        if self.opts.variant == "1q":
            loss = compress_loss(
                s, t, self.teacher_bank.items, self.teacher_bank.items, self.opts.tau_student, self.opts.tau_teacher
            )
            self._pending = (t, None)
        else:
            with torch.no_grad():
                key = F.normalize(self.momentum_head(self.momentum_backbone(images)).float(), dim=1)
            loss = compress_loss(
                s, t, self.student_bank.items, self.teacher_bank.items, self.opts.tau_student, self.opts.tau_teacher
            )
            self._pending = (t, key)
        return {"loss": loss}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        """Enqueue this batch (after the loss, so it was not its own anchor), then move the EMA student."""
        teacher_feats, student_keys = self._pending
        self.teacher_bank.push(teacher_feats)
        if student_keys is not None:
            self.student_bank.push(student_keys)
            ema_update(self.momentum_backbone, self.backbone, self.opts.momentum)
            ema_update(self.momentum_head, self.head, self.opts.momentum)


@full_precision
def compress_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_bank: torch.Tensor,
    teacher_bank: torch.Tensor,
    tau_student: float,
    tau_teacher: float,
) -> torch.Tensor:
    """KL(teacher || student) of softmax similarities to the banks, batchmean (inputs L2-normalised).

    1q passes the teacher bank twice; 2q passes the momentum student's bank for the student.
    """
    target = F.softmax(teacher @ teacher_bank.T / tau_teacher, dim=1)  # B x K
    log_student = F.log_softmax(student @ student_bank.T / tau_student, dim=1)  # B x K
    return F.kl_div(log_student, target, reduction="batchmean")
