"""BYOL (Grill et al. 2020): an online network predicts a slowly moving target network's projection.

No negatives: the online encoder + projector + predictor regresses the target encoder + projector's
output for the other view (2 - 2 cosine, symmetrised), and the target is an exponential moving
average of the online weights whose momentum rises from ``momentum`` to 1 on a cosine schedule.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.models.backbones import Backbone
from kt_edge.teachers.simclr import projection
from kt_edge.teachers.views import ViewPair, byol_pair


class BYOLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=256, ge=8, description="projection and prediction output")
    hidden: int = Field(default=4096, ge=8, description="projector and predictor hidden layer")
    momentum: float = Field(default=0.996, ge=0, le=1, description="target EMA momentum at the first step")


def momentum_at(step: int, total: int, base: float) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, from base at step 0 to 1 at the end."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020): predict an EMA target's projection of the other view; no negatives."""

    Options = BYOLOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = BYOLOptions(**options)
        self.backbone = backbone
        self.projector = projection(backbone.embed_dim, self.opts.hidden, self.opts.dim)
        self.predictor = projection(self.opts.dim, self.opts.hidden, self.opts.dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.momentum = self.opts.momentum  # of the last update; rises to 1

    @staticmethod
    def train_transform(image_size: int) -> ViewPair:
        return byol_pair(image_size)

    def training_step(self, batch):
        (v1, v2), _ = batch
        both = torch.cat([v1, v2])
        p1, p2 = self.predictor(self.projector(self.backbone(both))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_backbone(both)).chunk(2)
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
        return {"loss": loss, "momentum": torch.tensor(self.momentum)}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        """Move the target towards the online weights just updated by the optimiser."""
        self.momentum = momentum_at(step, total, self.opts.momentum)
        for online, target in ((self.backbone, self.target_backbone), (self.projector, self.target_projector)):
            for p, t in zip(online.parameters(), target.parameters()):
                t.lerp_(p.detach(), 1 - self.momentum)
