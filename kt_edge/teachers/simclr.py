"""SimCLR (Chen et al. 2020): two views of each image attract, every other image of the batch repels.

The loss is NT-Xent: for each of the 2N projected, L2-normalised views, a softmax over the other
2N - 1 with temperature tau, the other view of the same image being the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.models.backbones import Backbone
from kt_edge.teachers.views import ViewPair, simclr_view


class SimCLROptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=128, ge=8, description="projection output")
    hidden: int = Field(default=2048, ge=8, description="projection hidden layer")
    temperature: float = Field(default=0.5, gt=0, description="0.5: the paper's CIFAR-10 value (0.1 at batch 4096)")


def projection(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: the SimCLR and BYOL projector (and BYOL's predictor)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised-temperature cross-entropy over the 2N views of N images; z1[i] and z2[i] are positives."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    logits = (z @ z.T) / temperature
    logits.fill_diagonal_(float("-inf"))  # a view is not its own positive or negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): NT-Xent between two augmented views, in-batch negatives."""

    Options = SimCLROptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = SimCLROptions(**options)
        self.backbone = backbone
        self.head = projection(backbone.embed_dim, self.opts.hidden, self.opts.dim)

    @staticmethod
    def train_transform(image_size: int) -> ViewPair:
        view = simclr_view(image_size)
        return ViewPair(view, view)

    def training_step(self, batch):
        (v1, v2), _ = batch
        z1, z2 = self.head(self.backbone(torch.cat([v1, v2]))).chunk(2)
        return {"loss": nt_xent(z1, z2, self.opts.temperature)}
