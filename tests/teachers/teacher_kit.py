"""Helpers of the teacher tests: real sample images, one fixed batch, a few optimiser steps."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import default_collate

from kt_edge.data.sources import Images, open_images

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "cifar10"


def sample_images(n: int, seed: int = 0) -> Images:
    """A seeded subset of the shipped CIFAR-10 sample (real 32 px images)."""
    return open_images(SAMPLE / "train", subset=n, seed=seed)


def fixed_batch(method: torch.nn.Module, images: Images, image_size: int = 32, seed: int = 0):
    """One batch as the trainer's DataLoader would build it: (method's views, labels)."""
    torch.manual_seed(seed)
    transform = method.train_transform(image_size)
    return default_collate([(transform(images.image(i)), int(images.labels[i])) for i in range(len(images))])


def losses_over_steps(method: torch.nn.Module, batch, steps: int, lr: float = 1e-3) -> list[float]:
    """Train on the same batch for ``steps`` AdamW steps, calling after_step like the trainer; the losses."""
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    method.train()
    losses = []
    for step in range(steps):
        loss = method.training_step(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(method, "after_step"):
            method.after_step(step, steps)
        losses.append(loss.item())
    return losses


def coordinate_puzzle(side: int) -> torch.Tensor:
    """Channel 0 holds y / 255, channel 1 x / 255: every pixel says where it came from."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([y / 255, x / 255, torch.full((side, side), 0.5)]).float()
