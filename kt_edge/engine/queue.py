"""A FIFO queue of embeddings: MoCo's negatives, SEED's queue, CompRess's memory bank.

Under data parallelism every rank pushes the batch gathered from all ranks (as the official
MoCo/SEED code), so the queues stay identical without being broadcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kt_edge.engine.distributed import concat_all_gather


class FeatureQueue(nn.Module):
    """Starts as random unit vectors (as the official MoCo/SEED code) and is overwritten oldest first."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("items", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return len(self.items)

    @torch.no_grad()
    def push(self, batch: torch.Tensor) -> None:
        batch = concat_all_gather(batch.detach().contiguous())
        index = (self.ptr + torch.arange(len(batch), device=self.items.device)) % len(self.items)
        self.items[index] = batch.detach().to(self.items.dtype)
        self.ptr.copy_((self.ptr + len(batch)) % len(self.items))


def check_queue_size(key: str, size: int, n_images: int) -> None:
    """A queue as large as the dataset holds each image as its own negative (DESIGN.md): refuse it up front."""
    from kt_edge.errors import DataError

    if size >= n_images:
        raise DataError(f"{key} {size} is not smaller than the {n_images} training images: each image would be "
                        f"its own negative; set {key} below {n_images}")
