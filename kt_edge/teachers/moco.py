"""MoCo v2 (He et al. 2020; Chen et al. 2020): a momentum key encoder and a FIFO queue of keys.

Under data parallelism the key encoder sees a shuffled batch (shuffled BN, as the official code:
its BN statistics then mix images of every rank, so they cannot leak which key is the positive),
and every rank enqueues the keys of all ranks. One process emulates it as MoCo's own single-GPU
CIFAR demo does: ``SplitBatchNorm2d`` normalises ``bn_splits`` sub-batches (of at least 32 images)
with their own statistics in one call, and the keys are shuffled across them. Without it the
intra-batch statistics leak which key is the positive and the model "cheats" the pretext task
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
from kt_edge.engine.ema import ema_update
from kt_edge.engine.precision import full_precision
from kt_edge.engine.queue import FeatureQueue, check_queue_size, queue_field
from kt_edge.models.backbones import Backbone
from kt_edge.models.heads import projection_head
from kt_edge.models.split_batchnorm import split_count, use_split_batchnorm

MIN_SPLIT = 32  # images per BatchNorm sub-batch: fewer make the statistics too noisy


class MoCoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(default=128, ge=8)
    hidden: int = Field(default=2048, ge=8)
    queue: int = queue_field(65536, "negatives; a multiple of the batch, smaller than the dataset")
    momentum: float = Field(default=0.999, ge=0, lt=1)
    temperature: float = Field(default=0.2, gt=0)
    bn_splits: int = Field(
        default=8,
        ge=1,
        description="one process: BatchNorm statistics over up to this many "
        f"sub-batches of at least {MIN_SPLIT} images, keys shuffled across them (the shuffled "
        "BN of several GPUs)",
    )


class MoCo(nn.Module):
    """MoCo v2: InfoNCE against a queue of momentum-encoder keys."""

    Options = MoCoOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        opts = MoCoOptions(**options)
        check_queue_size("teacher.options.queue", opts.queue, n_images)
        self.momentum, self.temperature, self.bn_splits = opts.momentum, opts.temperature, opts.bn_splits
        self.backbone = backbone
        self.head = projection_head(backbone.embed_dim, opts.hidden, opts.dim)
        self._split_layers = use_split_batchnorm(backbone)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self._split_layers += use_split_batchnorm(self.key_backbone)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        self.queue = FeatureQueue(opts.queue, opts.dim)
        self._keys = None

    @property
    def projection(self) -> nn.Module:
        """The head whose output a distillation method may learn (``teacher_space: head``)."""
        return self.head

    @staticmethod
    def train_transform(image_size: int):
        return TwoViews(moco_v2(image_size))

    def training_step(self, batch):
        (query_view, key_view), _ = batch  # views: B x 3 x S x S
        splits = 1 if distributed.active() else split_count(len(query_view), self.bn_splits, MIN_SPLIT)
        for layer in self._split_layers:
            layer.splits = splits
        q = F.normalize(self.head(self.backbone(query_view)).float(), dim=1)  # q: B x dim
        with torch.no_grad():
            ema_update(self.key_backbone, self.backbone, self.momentum)
            ema_update(self.key_head, self.head, self.momentum)
            if distributed.active():
                key_view, inverse = shuffle_batch(key_view)
                k = unshuffle_batch(self.key_backbone(key_view), inverse)
            else:  # a query and its key never share BatchNorm statistics: no batch signature to match
                order = torch.randperm(len(key_view), device=key_view.device)
                k = self.key_backbone(key_view[order])[torch.argsort(order)]
            k = F.normalize(self.key_head(k).float(), dim=1)  # k: B x dim
        loss = moco_loss(q, k, self.queue.items, self.temperature)
        self._keys = k
        return {"loss": loss}

    @torch.no_grad()
    def after_step(self, step: int, total: int):
        self.queue.push(self._keys)


@full_precision
def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE: the key of the same image is the positive (index 0), the queue holds the negatives."""
    positive = (q * k).sum(dim=1, keepdim=True)  # B x 1
    negatives = q @ queue.T  # B x K
    logits = torch.cat([positive, negatives], dim=1) / temperature  # B x (1 + K)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
