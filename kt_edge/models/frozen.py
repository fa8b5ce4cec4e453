"""A teacher frozen for distillation: eval mode, no gradients, bf16 on GPU, outside the student's state."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kt_edge.engine.precision import autocast

TeacherSpace = Literal["head", "backbone"]  # which of the teacher's embeddings a distillation method learns


class FrozenTeacher:
    """Deliberately not an ``nn.Module``: its weights stay out of the student's optimiser and resume state.

    With a ``projection`` (the teacher's own projection head) it returns the head's output, the space
    SEED distils; without, the backbone's pooled features.
    """

    def __init__(self, model: nn.Module, device: torch.device, projection: nn.Module | None = None):
        self.model = model.to(device).eval().requires_grad_(False)
        self.projection = None if projection is None else projection.to(device).eval().requires_grad_(False)
        self.device = device
        self.space: TeacherSpace = "backbone" if projection is None else "head"
        self.embed_dim = model.embed_dim if projection is None else _out_features(projection)

    def networks(self) -> list[nn.Module]:
        return [self.model] + ([self.projection] if self.projection is not None else [])

    @torch.no_grad()  # not inference_mode: the loss keeps teacher outputs for the student's backward
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            features = self.model(x.to(self.device))
            if self.projection is not None:
                features = self.projection(features)
        return features.float()


def _out_features(head: nn.Module) -> int:
    return [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features
