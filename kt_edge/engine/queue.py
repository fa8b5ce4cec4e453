"""A FIFO queue of embeddings: MoCo's negatives, SEED's queue, CompRess's memory bank.

Under data parallelism every rank pushes the batch gathered from all ranks (as the official
MoCo/SEED code), so the queues stay identical without being broadcast.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from kt_edge.engine.distributed import concat_all_gather
from kt_edge.errors import DataError

log = logging.getLogger(__name__)
QUEUE = "kt_edge_queue"  # marks a method option that sizes a queue or memory bank


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


def queue_field(default: int, description: str):
    """A method option that sizes a queue or bank; the recipe checks it against the batch before any compute."""
    return Field(default=default, ge=1, description=description, json_schema_extra={QUEUE: True})


def queue_options(options: type[BaseModel]) -> list[str]:
    """The names of an ``Options`` model's queue and bank sizes."""
    return [
        name
        for name, field in options.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(QUEUE)
    ]


def check_queue_batch(key: str, size: int, batch: int, batch_key: str) -> None:
    """Whole batches fill a queue: at least one, and a whole number of them (the official MoCo and SEED
    code asserts ``K % batch_size == 0``), so no batch wraps around its end."""
    if size < batch or size % batch:
        raise ValueError(
            f"{key} {size} must be a multiple of {batch_key} {batch} (the global batch): "
            f"e.g. {max(batch, size // batch * batch)}"
        )


def check_queue_size(key: str, size: int, n_images: int) -> None:
    """A queue as large as the dataset holds each image as its own negative (DESIGN.md): refuse it up front;
    above a quarter of the dataset, warn: from the second epoch an image may meet its own earlier embedding."""
    if size >= n_images:
        raise DataError(
            f"{key} {size} is not smaller than the {n_images} training images: each image would be "
            f"its own negative; set {key} below {n_images}"
        )
    if size > n_images // 4:
        log.warning(
            "%s %d is over a quarter of the %d training images: from the second epoch an image can meet "
            "its own earlier embedding among the negatives",
            key,
            size,
            n_images,
        )
