"""MoCo v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder and a FIFO queue of keys.

Under data parallelism the key encoder sees a shuffled batch (shuffled BN, as the official code:
its BN statistics then mix images of every rank, so they cannot leak which key is the positive),
and every rank enqueues the keys of all ranks.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.data.augment import TwoViews, moco_v2
from kt_edge.engine.distributed import shuffle_batch, unshuffle_batch
from kt_edge.engine.queue import FeatureQueue, check_queue_size
from kt_edge.models.backbones import Backbone, mlp_head


class MoCoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=128, ge=8)
    hidden: int = Field(default=2048, ge=8)
    queue: int = Field(default=65536, ge=1, description="negatives; must be smaller than the dataset")
    momentum: float = Field(default=0.999, ge=0, lt=1)
    temperature: float = Field(default=0.2, gt=0)


class MoCo(nn.Module):
    """MoCo v2: InfoNCE against a queue of momentum-encoder keys."""

    Options = MoCoOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        opts = MoCoOptions(**options)
        check_queue_size("teacher.options.queue", opts.queue, n_images)
        self.momentum, self.temperature = opts.momentum, opts.temperature
        self.backbone = backbone
        self.head = mlp_head(backbone.embed_dim, opts.hidden, opts.dim)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.queue = FeatureQueue(opts.queue, opts.dim)
        self._keys = None

    @staticmethod
    def train_transform(image_size: int):
        return TwoViews(moco_v2(image_size))

    @torch.no_grad()
    def _momentum_update(self):
        for online, key in ((self.backbone, self.key_backbone), (self.head, self.key_head)):
            for p, k in zip(online.parameters(), key.parameters()):
                k.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    def training_step(self, batch):
        (query_view, key_view), _ = batch
        q = F.normalize(self.head(self.backbone(query_view)).float(), dim=1)
        with torch.no_grad():
            self._momentum_update()
            key_view, inverse = shuffle_batch(key_view)
            k = F.normalize(self.key_head(self.key_backbone(key_view)).float(), dim=1)
            k = unshuffle_batch(k, inverse)
        loss = moco_loss(q, k, self.queue.items, self.temperature)
        self._keys = k
        return {"loss": loss}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        self.queue.push(self._keys)


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: the key of the same image is the positive (index 0), the queue holds the negatives."""
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.T
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

