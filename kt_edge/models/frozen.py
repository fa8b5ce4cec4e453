"""A teacher frozen for distillation: eval mode, no gradients, bf16 on GPU, outside the student's state."""

from __future__ import annotations

from contextlib import nullcontext

import torch


class FrozenTeacher:
    """Deliberately not an ``nn.Module``: its weights stay out of the student's optimiser and resume state."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.embed_dim = model.embed_dim

    @torch.no_grad()  # not inference_mode: the loss keeps teacher outputs for the student's backward
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with autocast:
            return self.model(x.to(self.device)).float()
