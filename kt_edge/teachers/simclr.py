"""SimCLR (Chen et al. 2020): two views of each image attract, every other image of the batch repels.

The loss is NT-Xent: for each of the 2N projected, L2-normalised views, a softmax over the other
2N - 1 with temperature tau, the other view of the same image being the target. Under torchrun
the negatives are the views of the global batch (gathered from every rank with their gradients),
as the official code's cross-replica concatenation, and BatchNorm is synchronised on GPUs. The loss
is the mean over the 2N views, as the paper writes it; the official code sums the two views' means
(twice this value, a factor the learning rate absorbs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.data.augment import TwoViews
from kt_edge.engine import distributed
from kt_edge.engine.precision import full_precision
from kt_edge.models.backbones import Backbone
from kt_edge.models.heads import projection_head
from kt_edge.teachers.views import simclr_view


class SimCLROptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=128, ge=8, description="projection output")
    hidden: int = Field(default=2048, ge=8, description="projection hidden layer")
    temperature: float = Field(default=0.5, gt=0, description="0.5: the paper's CIFAR-10 value (0.1 at batch 4096)")


@full_precision
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross-entropy; z1[i] and z2[i] (this rank's n images) are positives, and every
    other view of the global batch (N images over all ranks) is a negative."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)  # n x dim
    all1, all2 = distributed.all_gather_grad(z1), distributed.all_gather_grad(z2)  # N x dim
    n = len(z1)
    positives = torch.arange(n, device=z1.device) + distributed.rank() * n  # global index of each own image
    itself = positives[:, None] == torch.arange(len(all1), device=z1.device)[None, :]  # n x N
    logits_a = torch.cat([z1 @ all2.T, (z1 @ all1.T).masked_fill(itself, float("-inf"))], dim=1)  # n x 2N
    logits_b = torch.cat([z2 @ all1.T, (z2 @ all2.T).masked_fill(itself, float("-inf"))], dim=1)
    return (F.cross_entropy(logits_a / temperature, positives) + F.cross_entropy(logits_b / temperature, positives)) / 2


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): NT-Xent between two augmented views, negatives from the whole batch."""

    Options = SimCLROptions
    sync_batchnorm = True  # under torchrun on GPUs, as the official code's global BN

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = SimCLROptions(**options)
        self.backbone = backbone
        self.head = projection_head(backbone.embed_dim, self.opts.hidden, self.opts.dim, batchnorm=True)

    @property
    def projection(self) -> nn.Module:
        """The head whose output a distillation method may learn (``teacher_space: head``)."""
        return self.head

    @staticmethod
    def train_transform(image_size: int) -> TwoViews:
        return TwoViews(simclr_view(image_size))

    def training_step(self, batch):
        (v1, v2), _ = batch  # views: B x 3 x S x S
        z1, z2 = self.head(self.backbone(torch.cat([v1, v2]))).chunk(2)  # B x dim each
        return {"loss": nt_xent(z1, z2, self.opts.temperature)}

    def after_step(self, step: int, total: int) -> None:
        """Nothing moves after the optimiser's step: no momentum encoder, no queue."""
