"""Helpers of the teacher tests: a few optimiser steps on one batch, puzzles whose pixels say where they came from."""

from __future__ import annotations

import torch


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
