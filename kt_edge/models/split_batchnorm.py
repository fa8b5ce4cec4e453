"""BatchNorm over sub-batches in one call: what several GPUs' per-device BatchNorm gives, in one process.

MoCo's shuffled BN needs the query and its key to be normalised with statistics of different images.
On one device the official CIFAR-10 demo of MoCo (facebookresearch/moco, colab notebook) reshapes the
batch so that one ``batch_norm`` call normalises each of ``splits`` sub-batches with its own statistics,
then averages the per-split running statistics into one update per step. This module does the same by
swapping the class of a network's ``BatchNorm2d`` layers, so its parameters, buffers and state-dict keys
stay those of a plain ``BatchNorm2d`` (a saved network loads into an unmodified one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are per sub-batch: sample i belongs to split ``i % splits``."""

    splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.splits == 1:
            return super().forward(x)
        if n % self.splits:
            raise ValueError(f"a batch of {n} does not split into {self.splits} BatchNorm sub-batches")
        s = self.splits
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        # Sample i's channels become channels (i % s) * c ... of a batch of n / s: NCHW order is needed for that view.
        out = F.batch_norm(
            x.contiguous().view(n // s, c * s, h, w),
            mean,
            var,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum,
            self.eps,
        ).view(n, c, h, w)
        with torch.no_grad():  # one running-statistics update per step: the mean of the splits'
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out


def use_split_batchnorm(network: nn.Module) -> list[SplitBatchNorm2d]:
    """Turn every BatchNorm2d of ``network`` into a SplitBatchNorm2d in place; the layers, to set ``splits`` on."""
    layers = []
    for module in network.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = SplitBatchNorm2d
        if isinstance(module, SplitBatchNorm2d):
            layers.append(module)
    return layers


def split_count(batch: int, wanted: int, min_per_split: int = 32) -> int:
    """The most sub-batches, at most ``wanted``, that divide ``batch`` into parts of at least ``min_per_split``."""
    return max([s for s in range(1, wanted + 1) if batch % s == 0 and batch // s >= min_per_split] or [1])
