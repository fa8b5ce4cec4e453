"""BYOL (Grill et al. 2020): an online network predicts a slowly moving target network's projection.

No negatives: the online encoder + projector + predictor regresses the target encoder + projector's
output for the other view (2 - 2 cosine, symmetrised), and the target is an exponential moving
average of the online weights whose momentum rises from ``momentum`` to 1 on a cosine schedule.
Each view goes through the networks on its own, as in the official code, so BatchNorm statistics
are those of one view (SyncBatchNorm over every rank's images under torchrun on GPUs).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.data.augment import TwoViews
from kt_edge.engine.ema import ema_update
from kt_edge.engine.precision import full_precision
from kt_edge.models.backbones import Backbone
from kt_edge.models.heads import projection_head
from kt_edge.teachers.views import byol_pair


class BYOLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=256, ge=8, description="projection and prediction output")
    hidden: int = Field(default=4096, ge=8, description="projector and predictor hidden layer")
    momentum: float = Field(default=0.996, ge=0, le=1, description="target EMA momentum at the first step")


def momentum_at(step: int, total: int, base: float) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, from base at step 0 to 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


@full_precision
def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020): predict an EMA target's projection of the other view; no negatives."""

    Options = BYOLOptions
    sync_batchnorm = True  # under torchrun on GPUs, as the official code

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = BYOLOptions(**options)
        self.backbone = backbone
        self.projector = projection_head(backbone.embed_dim, self.opts.hidden, self.opts.dim, batchnorm=True)
        self.predictor = projection_head(self.opts.dim, self.opts.hidden, self.opts.dim, batchnorm=True)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.momentum = self.opts.momentum  # of the last update; rises to 1

    @staticmethod
    def train_transform(image_size: int) -> TwoViews:
        return byol_pair(image_size)

    @property
    def projection(self) -> nn.Module:
        """The head whose output a distillation method may learn (``teacher_space: head``)."""
        return self.projector

    def training_step(self, batch):
        (v1, v2), _ = batch  # views: B x 3 x S x S
        p1, p2 = (self.predictor(self.projector(self.backbone(v))) for v in (v1, v2))  # B x dim each
        with torch.no_grad():
            z1, z2 = (self.target_projector(self.target_backbone(v)) for v in (v1, v2))
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        return {"loss": loss, "momentum": loss.new_full((), self.momentum).detach()}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        """Move the target towards the online weights just updated by the optimiser."""
        self.momentum = momentum_at(step, total, self.opts.momentum)
        ema_update(self.target_backbone, self.backbone, self.momentum)
        ema_update(self.target_projector, self.projector, self.momentum)
