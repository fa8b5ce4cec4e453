"""SEED (Fang et al., ICLR 2021): the student matches the teacher's similarity distribution over a queue.

Teacher and student see the same augmented view. Both embeddings are L2-normalised, the student's
after an MLP head that maps to the teacher's dimension. The teacher's embedding is its projection
head's output by default (``teacher_space: head``; 128-d for MoCo v2), as the official code loads its
MoCo teacher with the ``fc`` head kept; ``backbone`` distils the pooled backbone features instead.
Logits are dot products with a FIFO queue of teacher embeddings, the teacher's own embedding
prepended as the positive; the target is softmax(z_T / tau_T), the loss the soft cross-entropy with
log_softmax(z_S / tau_S), in fp32 (at tau_T = 1e-4 a bf16 rounding step is tens of logits). The
batch is enqueued after the loss, as in the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.data.augment import moco_v2
from kt_edge.engine.precision import full_precision
from kt_edge.engine.queue import FeatureQueue, check_queue_size, queue_field
from kt_edge.models.backbones import Backbone
from kt_edge.models.frozen import FrozenTeacher, TeacherSpace
from kt_edge.models.heads import projection_head


class SeedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: int = queue_field(65536, "teacher embeddings; a multiple of the batch, smaller than the dataset")
    tau_student: float = Field(default=0.2, gt=0)
    tau_teacher: float = Field(default=1e-4, gt=0)
    hidden: int = Field(default=2048, ge=8)
    self_positive: bool = True
    teacher_space: TeacherSpace = Field(
        default="head",
        description="distil the teacher's projection-head output "
        "(head, as the official code) or its pooled backbone features (backbone)",
    )


class Seed(nn.Module):
    """SEED: soft contrastive cross-entropy over a queue of teacher embeddings."""

    Options = SeedOptions

    def __init__(self, student: Backbone, teacher: FrozenTeacher, options: dict, n_images: int):
        super().__init__()
        self.opts = SeedOptions(**options)
        check_queue_size("distill.options.queue", self.opts.queue, n_images)
        self.backbone = student
        self.teacher = teacher
        self.head = projection_head(student.embed_dim, self.opts.hidden, teacher.embed_dim)
        self.queue = FeatureQueue(self.opts.queue, teacher.embed_dim)
        self._pending = None

    @staticmethod
    def train_transform(image_size: int):
        return moco_v2(image_size)

    def training_step(self, batch):
        images, _ = batch  # B x 3 x S x S
        t = F.normalize(self.teacher(images), dim=1)  # t: B x D (the teacher's space)
        s = F.normalize(self.head(self.backbone(images)).float(), dim=1)  # s: B x D
        loss = seed_loss(s, t, self.queue.items, self.opts.tau_student, self.opts.tau_teacher, self.opts.self_positive)
        self._pending = t
        return {"loss": loss}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        self.queue.push(self._pending)


@full_precision
def seed_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    tau_student: float,
    tau_teacher: float,
    self_positive: bool = True,
) -> torch.Tensor:
    """Soft cross-entropy between teacher and student similarity distributions (inputs L2-normalised)."""
    logits_s = student @ queue.T  # B x K
    logits_t = teacher @ queue.T
    if self_positive:
        logits_s = torch.cat([(student * teacher).sum(1, keepdim=True), logits_s], dim=1)
        logits_t = torch.cat([(teacher * teacher).sum(1, keepdim=True), logits_t], dim=1)  # B x (1 + K)
    target = F.softmax(logits_t / tau_teacher, dim=1)
    return -(target * F.log_softmax(logits_s / tau_student, dim=1)).sum(dim=1).mean()
