"""Where work runs: a recipe's ``device`` (auto, cpu, cuda) as a torch device."""

from __future__ import annotations

import torch

from kt_edge.errors import KtEdgeError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None: this rank's GPU if torch sees one, else the CPU."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KtEdgeError("device 'cuda' asked for, but torch sees no GPU; use device: auto or cpu")
    return device
