"""The momentum (EMA) update of a target network: MoCo's key encoder, BYOL's target, CompRess 2q's student copy."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every parameter, in one fused kernel per dtype.

    Buffers (BatchNorm statistics) are left alone: the target's own forward passes update them, as in the
    official MoCo, BYOL and CompRess code.
    """
    targets, onlines = list(target.parameters()), [p.detach() for p in online.parameters()]
    if len(targets) != len(onlines):
        raise ValueError(f"EMA target has {len(targets)} parameters, online network {len(onlines)}")
    if targets:  # a parameter-free network (nn.Identity) has nothing to move
        torch._foreach_lerp_(targets, onlines, 1.0 - momentum)
