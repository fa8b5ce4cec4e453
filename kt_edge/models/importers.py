"""Teachers from checkpoint files: our own checkpoint folders and torchvision state dicts.

Files are read with ``weights_only=True`` or as safetensors, so a checkpoint cannot run code.
No code path downloads weights.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors.torch import load_file

from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import Backbone, build_backbone
from kt_edge.models.checkpoint import SIDECAR, load_backbone, load_weights


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat tensor dict from a safetensors file or a torch pickle loaded with weights_only=True."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused, the pickle holds more than weights "
                              f"(weights_only=True): {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__})") from None
    for key in ("state_dict", "model"):  # common wrappers around the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return obj


def torchvision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision classifier's keys as our backbone's: classifier dropped, ``body.`` prefixed."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {f"body.{k}": v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}


def import_teacher(path: Path, arch: str, image_size: int) -> Backbone:
    path = Path(path)
    if path.is_dir() and (path / SIDECAR).is_file():
        return load_backbone(path)[0]
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint not found: {path}")
    backbone = build_backbone(arch, image_size)
    state = read_state_dict(path)
    if not any(k.startswith("body.") for k in state):
        state = torchvision_state(state)
    load_weights(backbone, state, source=str(path))
    return backbone.eval()
