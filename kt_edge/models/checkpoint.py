"""Model checkpoints: weights as safetensors, and a JSON sidecar that says how to rebuild and feed them.

The sidecar is written last, so a folder with a sidecar holds a complete checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kt_edge import atomic
from kt_edge.data.augment import MEAN, STD, resize_for
from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import Backbone, build_backbone

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"


def save_backbone(backbone: Backbone, folder: Path, **provenance) -> None:
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic.atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    atomic.write_json(folder / SIDECAR, {
        "arch": backbone.arch,
        "image_size": backbone.image_size,
        "embed_dim": backbone.embed_dim,
        "resize": resize_for(backbone.image_size),
        "crop": backbone.image_size,
        "mean": list(MEAN),
        "std": list(STD),
        **provenance,
    })


def read_sidecar(folder: Path) -> dict | None:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def load_backbone(folder: Path) -> tuple[Backbone, dict]:
    """Rebuild a backbone from a checkpoint folder written by ``save_backbone``."""
    folder = Path(folder)
    card = read_sidecar(folder)
    if card is None or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: no complete checkpoint ({WEIGHTS} + {SIDECAR})")
    backbone = build_backbone(card["arch"], card["image_size"])
    load_weights(backbone, load_file(str(folder / WEIGHTS)), source=str(folder / WEIGHTS))
    return backbone.eval(), card


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict that fails with the missing and unexpected keys named."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            f"missing {_few(missing)}; unexpected {_few(unexpected)}")


def _few(keys: list[str]) -> str:
    return "[]" if not keys else "[" + ", ".join(keys[:5]) + (f", ... {len(keys)} in all" if len(keys) > 5 else "") + "]"
