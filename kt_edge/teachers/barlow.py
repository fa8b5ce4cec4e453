"""Barlow Twins (Zbontar et al. 2021): make the cross-correlation of two views' embeddings the identity.

Each view's projection is standardised over the batch; C = z1^T z2 / N. The loss pulls the diagonal
of C to 1 (invariance) and, weighted by lambda = 5e-3, the off-diagonal to 0 (redundancy reduction).
Under torchrun the standardisation and C are over the global batch: the per-rank sums are
all-reduced with their gradients, so the loss and its gradient are those of one process on the
whole batch. (The official code all-reduces C in place, outside autograd, which scales the
gradient by 1 / world size; its LARS optimiser does not see the scale, SGD would.)
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.data.augment import TwoViews
from kt_edge.engine import distributed
from kt_edge.engine.precision import full_precision
from kt_edge.models.backbones import Backbone
from kt_edge.models.heads import projection_head
from kt_edge.teachers.views import byol_pair

EPS = 1e-5  # BatchNorm's


class BarlowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=8192, ge=8, description="projector output: the cross-correlation is dim x dim")
    hidden: int = Field(default=8192, ge=8, description="projector hidden layers (two)")
    lambd: float = Field(default=5e-3, ge=0, description="weight of the off-diagonal (redundancy) terms")


def standardize(z: torch.Tensor) -> torch.Tensor:
    """Each dimension to zero mean and unit (biased) variance over the global batch, as BatchNorm1d without
    affine parameters (the official code's ``self.bn``)."""
    n = len(z) * distributed.world_size()
    mean = distributed.all_reduce_grad(z.sum(0)) / n
    centred = z - mean
    var = distributed.all_reduce_grad(centred.pow(2).sum(0)) / n
    return centred * torch.rsqrt(var + EPS)


@full_precision
def barlow_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 with C the batch cross-correlation of z1 and z2."""
    n = len(z1) * distributed.world_size()
    c = distributed.all_reduce_grad(standardize(z1).T @ standardize(z2)) / n  # dim x dim
    on_diagonal = (torch.diagonal(c) - 1).pow(2).sum()
    off_diagonal = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diagonal + lambd * off_diagonal


class BarlowTwins(nn.Module):
    """Barlow Twins (Zbontar et al. 2021): cross-correlation of two views' projections towards the identity."""

    Options = BarlowOptions
    sync_batchnorm = True  # under torchrun on GPUs, as the official code

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = BarlowOptions(**options)
        self.backbone = backbone
        h, d = self.opts.hidden, self.opts.dim  # as the official code: bias-free linears, BN + ReLU between
        self.projector = projection_head(backbone.embed_dim, h, d, layers=3, batchnorm=True, bias=False)

    @property
    def projection(self) -> nn.Module:
        """The head whose output a distillation method may learn (``teacher_space: head``)."""
        return self.projector

    @staticmethod
    def train_transform(image_size: int) -> TwoViews:
        return byol_pair(image_size)

    def training_step(self, batch):
        (v1, v2), _ = batch  # views: B x 3 x S x S
        z1 = self.projector(self.backbone(v1))  # B x dim
        z2 = self.projector(self.backbone(v2))
        return {"loss": barlow_loss(z1, z2, self.opts.lambd)}

    def after_step(self, step: int, total: int) -> None:
        """Nothing moves after the optimiser's step: no momentum encoder, no queue."""
