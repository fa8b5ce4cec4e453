"""Numeric precision: bf16 autocast for the networks on CUDA, fp32 for every loss.

Networks run under bf16 autocast on CUDA (fp32 on the CPU, so CPU runs stay exact and
reproducible). The similarity-softmax losses do not: SEED divides dot products by tau_T = 1e-4,
where one bf16 rounding step of a cosine (2^-8) becomes tens of logits, so the teacher's target
distribution would move off its positive. Every loss is therefore computed in fp32 with autocast
off (``full_precision``), as the official CompRess code casts its similarities to float.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when ``enabled``; no autocast elsewhere."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def full_precision(loss):
    """Decorate a loss of tensors: its tensor arguments become fp32 and it runs with autocast off."""

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        device_type = next(a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        args = [_fp32(a) for a in args]
        kwargs = {k: _fp32(v) for k, v in kwargs.items()}
        off = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else nullcontext()
        )
        with off:
            return loss(*args, **kwargs)

    return wrapper


def _fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
