"""CompRess (Koohpayegani et al., NeurIPS 2020): the student mimics the teacher's similarities to anchors.

Teacher and student embeddings are L2-normalised and compared with a memory bank of anchor
embeddings; both similarity vectors are divided by a temperature (T = 0.04) and the loss is
KL(teacher || student), averaged over the batch. The banks are updated FIFO after the loss and
the current batch is never its own anchor (no self-positive), as in the official code.

- ``1q``: one bank of teacher embeddings; the student is mapped to the teacher's dimension by a
  linear layer and compared with the same anchors.
- ``2q``: the teacher bank for the teacher, and a second bank filled with the embeddings of a
  momentum (EMA, alpha 0.999) copy of the student for the student.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.data.augment import moco_v2
from kt_edge.engine.queue import FeatureQueue, check_queue_size
from kt_edge.models.backbones import Backbone
from kt_edge.transfer.cached_teacher import check_teacher_source, teacher_embedding


class CompressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: Literal["1q", "2q"] = "2q"
    bank: int = Field(default=128000, ge=1, description="anchors per bank; must be smaller than the dataset")
    tau_teacher: float = Field(default=0.04, gt=0)
    tau_student: float = Field(default=0.04, gt=0)
    dim: int = Field(default=128, ge=8, description="2q: the student's linear projection size")
    momentum: float = Field(default=0.999, ge=0, lt=1, description="2q: EMA of the student that fills its bank")
    teacher_features: Literal["live", "cached"] = Field(
        default="live", description="cached: un-augmented teacher features extracted once (kt-edge features)")


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
            self.head = nn.Linear(student.embed_dim, self.opts.dim)
            self.momentum_backbone = copy.deepcopy(student).requires_grad_(False)
            self.momentum_head = copy.deepcopy(self.head).requires_grad_(False)
            self.student_bank = FeatureQueue(self.opts.bank, self.opts.dim)
        self._pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @staticmethod
    def needs(options: dict) -> str | None:
        return "cached_features" if options.get("teacher_features") == "cached" else None

    @staticmethod
    def train_transform(image_size: int):
        return moco_v2(image_size)

    def training_step(self, batch):
        images, targets = batch
        t = F.normalize(teacher_embedding(self.teacher, images, targets, self.opts.teacher_features), dim=1)
        s = F.normalize(self.head(self.backbone(images)).float(), dim=1)
        if self.opts.variant == "1q":
            loss = compress_loss(s, t, self.teacher_bank.items, self.teacher_bank.items,
                                 self.opts.tau_student, self.opts.tau_teacher)
            self._pending = (t, None)
        else:
            with torch.no_grad():
                key = F.normalize(self.momentum_head(self.momentum_backbone(images)).float(), dim=1)
            loss = compress_loss(s, t, self.student_bank.items, self.teacher_bank.items,
                                 self.opts.tau_student, self.opts.tau_teacher)
            self._pending = (t, key)
        return {"loss": loss}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        """Enqueue this batch (after the loss, so it was not its own anchor), then move the EMA student."""
        teacher_feats, student_keys = self._pending
        self.teacher_bank.push(teacher_feats)
        if student_keys is not None:
            self.student_bank.push(student_keys)
            for online, ema in ((self.backbone, self.momentum_backbone), (self.head, self.momentum_head)):
                for p, m in zip(online.parameters(), ema.parameters()):
                    m.mul_(self.opts.momentum).add_(p.detach(), alpha=1 - self.opts.momentum)


def compress_loss(student: torch.Tensor, teacher: torch.Tensor, student_bank: torch.Tensor,
                  teacher_bank: torch.Tensor, tau_student: float, tau_teacher: float) -> torch.Tensor:
    """KL(teacher || student) of softmax similarities to the banks, batchmean (inputs L2-normalised).

    1q passes the teacher bank twice; 2q passes the momentum student's bank for the student.
    Computed in fp32 even under autocast: at T = 0.04, bf16 similarities would blur the target.
    """
    with torch.autocast(student.device.type, enabled=False):
        target = F.softmax(teacher.float() @ teacher_bank.float().T / tau_teacher, dim=1)
        log_student = F.log_softmax(student.float() @ student_bank.float().T / tau_student, dim=1)
        return F.kl_div(log_student, target, reduction="batchmean")
