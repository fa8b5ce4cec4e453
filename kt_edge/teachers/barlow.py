"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of two views' embeddings the identity.

Each view's projection is standardised over the batch; C = z1^T z2 / N. The loss pulls the diagonal
of C to 1 (invariance) and, weighted by lambda = 5e-3, the off-diagonal to 0 (redundancy reduction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.models.backbones import Backbone
from kt_edge.teachers.views import ViewPair, byol_pair


class BarlowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=8192, ge=8, description="projector output: the cross-correlation is dim x dim")
    hidden: int = Field(default=8192, ge=8, description="projector hidden layers (two)")
    lambd: float = Field(default=5e-3, ge=0, description="weight of the off-diagonal (redundancy) terms")


def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 with C the batch cross-correlation of z1 and z2."""
    n = len(z1)
    z1 = F.batch_norm(z1.float(), None, None, training=True)  # standardise each dimension over the batch
    z2 = F.batch_norm(z2.float(), None, None, training=True)
    c = z1.T @ z2 / n
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + lambd * off_diagonal


class BarlowTwins(nn.Module):
    """Barlow Twins (Zbontar et al. 2021): cross-correlation of two views' projections towards the identity."""

    Options = BarlowOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = BarlowOptions(**options)
        self.backbone = backbone
        h, d = self.opts.hidden, self.opts.dim
        self.projector = nn.Sequential(  # as the official code: bias-free linears, BN + ReLU between
            nn.Linear(backbone.embed_dim, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Linear(h, d, bias=False))

    @staticmethod
    def train_transform(image_size: int) -> ViewPair:
        return byol_pair(image_size)

    def training_step(self, batch):
        (v1, v2), _ = batch
        z1 = self.projector(self.backbone(v1))
        z2 = self.projector(self.backbone(v2))
        return {"loss": barlow_loss(z1, z2, self.opts.lambd)}
