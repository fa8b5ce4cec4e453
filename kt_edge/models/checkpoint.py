"""Model checkpoints: weights as safetensors, and a JSON sidecar that says how to rebuild and feed them.

A teacher's checkpoint may also hold its projection head (the weights under ``projection.``, the
layers in the sidecar), the space SEED distils. The sidecar is written last, so a folder with a
sidecar holds a complete checkpoint.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kt_edge import atomic
from kt_edge.data.augment import MEAN, STD, resize_for
from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import Backbone, build_backbone
from kt_edge.models.heads import build_head, head_spec
from kt_edge.models.parts import join_parts
from kt_edge.models.timm_teacher import TIMM_PREFIX, build_timm

WEIGHTS = "model.safetensors"
SIDECAR = "model.json"
PROJECTION = "projection."  # key prefix of a teacher's projection head in WEIGHTS


def save_backbone(
    backbone: Backbone, folder: Path, projection: torch.nn.Sequential | None = None, **provenance
) -> None:
    """Weights (with the projection head, when given), then the sidecar that vouches for them."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    if projection is not None:
        state.update({PROJECTION + k: v.detach().cpu().contiguous() for k, v in projection.state_dict().items()})
        provenance["projection"] = head_spec(projection)
    # An old sidecar would vouch for the new weights if we stopped between the two writes.
    (folder / SIDECAR).unlink(missing_ok=True)
    with atomic.atomic_path(folder / WEIGHTS) as tmp, atomic.os_errors():
        save_file(state, str(tmp))
    atomic.write_json(
        folder / SIDECAR,
        {
            "arch": backbone.arch,
            "image_size": backbone.image_size,
            "embed_dim": backbone.embed_dim,
            **({"layer": backbone.layer} if getattr(backbone, "layer", None) else {}),
            "resize": resize_for(backbone.image_size),
            "crop": backbone.image_size,
            "mean": list(MEAN),
            "std": list(STD),
            **provenance,
        },
    )


def read_sidecar(folder: Path) -> dict | None:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
    except ValueError:  # not JSON, or not UTF-8
        return None
    return card if isinstance(card, dict) else None


def load_torch_file(path: Path, what: str, advice: str = "", allowed: tuple[type, ...] = ()) -> object:
    """A torch file read with ``weights_only=True``, so loading it runs no code. A pickle that holds more than
    tensors, containers and plain values (``allowed`` adds classes) is refused, naming the global it would call."""
    advice = f"; {advice}" if advice else ""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global: GLOBAL x.y", or "unsupported GLOBAL x.y whose module x is blocked"
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path}: refused, the pickle holds more than weights: it would call "
                f"{found.group(1)}; kt-edge will not load it{advice}"
            ) from None
        raise CheckpointError(f"{path}: not a readable {what} (the pickle is damaged or not one){advice}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{path}: not a readable {what} ({exc.__class__.__name__}: {(str(exc).splitlines() or [''])[0]}){advice}"
        ) from None


def load_backbone(folder: Path) -> tuple[Backbone, dict]:
    """Rebuild a backbone from a checkpoint folder written by ``save_backbone``."""
    folder = Path(folder)
    card = read_sidecar(folder)
    if card is not None and not (folder / WEIGHTS).is_file() and isinstance(card.get("parts"), dict):
        join_parts(folder, card)  # weights shipped in parts: joined, sha256-checked, on first use
    if card is None or not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: no complete checkpoint ({WEIGHTS} + {SIDECAR})")
    try:
        backbone = _rebuild(card)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"{folder / SIDECAR}: not a valid checkpoint sidecar ({exc!r})") from None
    state = _read_weights(folder)
    load_weights(
        backbone, {k: v for k, v in state.items() if not k.startswith(PROJECTION)}, source=str(folder / WEIGHTS)
    )
    return backbone.eval(), card


def load_projection(folder: Path) -> torch.nn.Sequential | None:
    """A teacher checkpoint's projection head, in eval mode; None when it has none."""
    folder = Path(folder)
    card = read_sidecar(folder) or {}
    if not card.get("projection"):
        return None
    try:
        head = build_head(card["projection"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / SIDECAR}: not a valid projection head ({exc!r})") from None
    state = {k.removeprefix(PROJECTION): v for k, v in _read_weights(folder).items() if k.startswith(PROJECTION)}
    load_weights(head, state, source=f"{folder / WEIGHTS} (projection head)")
    return head.eval()


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{folder / WEIGHTS}: not a readable safetensors file ({exc})") from None


def _rebuild(card: dict) -> torch.nn.Module:
    """The untrained model a sidecar describes: a backbone at its layer, or an imported timm teacher."""
    if card["arch"].startswith(TIMM_PREFIX):
        return build_timm(card["arch"].removeprefix(TIMM_PREFIX), card["image_size"])
    return build_backbone(card["arch"], card["image_size"], card.get("layer"))


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict that fails with the missing, unexpected and wrongly shaped keys named."""
    own = model.state_dict()
    wrong = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: shapes differ (checkpoint vs model) for {_few(wrong)}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: missing {_few(missing)}; unexpected {_few(unexpected)}"
        )


def _few(keys: list[str]) -> str:
    return (
        "[]" if not keys else "[" + ", ".join(keys[:5]) + (f", ... {len(keys)} in all" if len(keys) > 5 else "") + "]"
    )
