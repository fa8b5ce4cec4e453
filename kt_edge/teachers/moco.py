"""MoCo v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder and a FIFO queue of keys.

Under data parallelism the key encoder sees a shuffled batch (shuffled BN, as the official code:
its BN statistics then mix images of every rank, so they cannot leak which key is the positive),
and every rank enqueues the keys of all ranks. One process emulates it as MoCo's own single-GPU
CIFAR demo does: BatchNorm over ``bn_splits`` sub-batches, the keys shuffled across them. Without
it the intra-batch statistics leak which key is the positive and the model "cheats" the pretext task
with a low loss (He et al. 2020, Sec. 3.3).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.data.augment import TwoViews, moco_v2
from kt_edge.engine import distributed
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
    bn_splits: int = Field(default=8, ge=1, description="one process: BatchNorm statistics over this many "
                           "sub-batches, keys shuffled across them (the shuffled BN of several GPUs)")


class MoCo(nn.Module):
    """MoCo v2: InfoNCE against a queue of momentum-encoder keys."""

    Options = MoCoOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        opts = MoCoOptions(**options)
        check_queue_size("teacher.options.queue", opts.queue, n_images)
        self.momentum, self.temperature, self.bn_splits = opts.momentum, opts.temperature, opts.bn_splits
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
        splits = 1 if distributed.active() else self.bn_splits
        q = F.normalize(self.head(split_forward(self.backbone, query_view, splits)).float(), dim=1)
        with torch.no_grad():
            self._momentum_update()
            if splits == 1:
                key_view, inverse = shuffle_batch(key_view)
                k = unshuffle_batch(self.key_backbone(key_view), inverse)
            else:  # a query and its key never share BatchNorm statistics: no batch signature to match
                order = torch.randperm(len(key_view), device=key_view.device)
                k = split_forward(self.key_backbone, key_view[order], splits)[torch.argsort(order)]
            k = F.normalize(self.key_head(k).float(), dim=1)
        loss = moco_loss(q, k, self.queue.items, self.temperature)
        self._keys = k
        return {"loss": loss}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        self.queue.push(self._keys)


def split_forward(net: nn.Module, x: torch.Tensor, splits: int) -> torch.Tensor:
    """``net`` on ``splits`` sub-batches, so its BatchNorm statistics are those of each sub-batch."""
    return net(x) if splits == 1 else torch.cat([net(chunk) for chunk in x.chunk(splits)])


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: the key of the same image is the positive (index 0), the queue holds the negatives."""
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ queue.T
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

