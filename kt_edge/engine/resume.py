"""The resume point: everything a stopped training stage needs to go on exactly where it stopped.

The method's state (networks, queues and banks), the optimiser, the step, and the random generators
(the CPU's, and the GPU's on CUDA) are written atomically; the stage's inputs digest and its number
of images make sure it is only ever used for the inputs it was made from. Queues and banks are kept,
although they could be refilled: a refilled queue gives the first steps after a resume other
negatives, and a resumed run must equal an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kt_edge import atomic
from kt_edge.errors import CheckpointError, KtEdgeError, TrainingError
from kt_edge.models.checkpoint import load_torch_file

RESUME = "resume.pt"
KEYS = {"method", "optimizer", "rng", "step", "fingerprint"}


def rng_state(device: torch.device) -> dict:
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def check_finite(method: torch.nn.Module, stage: str, step: int, folder: Path) -> None:
    """Called before each write, so the last resume point is always a good one."""
    if not all(bool(torch.isfinite(t).all()) for t in method.state_dict().values() if t.is_floating_point()):
        raise TrainingError(
            f"{stage}: the weights became inf or NaN at step {step}; the last resume point in {folder} is kept"
        )


def write(
    path: Path,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    device: torch.device,
    fingerprint: str,
    images: int,
) -> None:
    with atomic.atomic_file(path) as handle:  # a full disk surfaces as the OSError it is
        torch.save(
            {
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "fingerprint": fingerprint,
                "images": images,
                **rng_state(device),
            },
            handle,
        )


def read(path: Path, fingerprint: str, images: int) -> dict:
    """A resume point made from these inputs, loaded with weights_only=True: a planted pickle cannot run code."""
    state = load_torch_file(path, "resume point", advice="delete it and run without --resume")
    if not isinstance(state, dict) or not KEYS <= set(state):
        raise CheckpointError(f"{path}: not a kt-edge resume point (expected the keys {', '.join(sorted(KEYS))})")
    if state.get("fingerprint", "") != fingerprint or state.get("images", images) != images:
        raise KtEdgeError(
            f"{path} was written for other inputs (the recipe or the images changed); "
            "run without --resume to start this stage again"
        )
    return state
