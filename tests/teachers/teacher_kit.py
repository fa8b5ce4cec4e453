"""Helpers of the teacher tests: puzzles whose pixels say where they came from."""

from __future__ import annotations

import torch


def coordinate_puzzle(side: int) -> torch.Tensor:
    """Channel 0 holds y / 255, channel 1 x / 255: every pixel says where it came from."""
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([y / 255, x / 255, torch.full((side, side), 0.5)]).float()
