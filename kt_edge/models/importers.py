"""Teachers from checkpoint files: our own, torchvision, the official MoCo / SwAV / DINO releases, and timm.

``teacher.format`` says how a checkpoint's keys map onto our backbone; ``auto`` reads the keys:

- ``kt-edge``: a folder written by ``save_backbone``, or a state dict whose keys start with ``body.``;
- ``torchvision``: a torchvision ResNet state dict (``fc.*`` dropped, a ``module.`` prefix allowed);
- ``moco``: MoCo v1/v2 (``module.encoder_q.*``) and v3 (``module.base_encoder.*``) inside ``state_dict``;
  the projection head in ``fc.*`` is kept apart, the key encoder, queue and predictor are dropped;
- ``swav``: ``module.*``; the head in ``projection_head.*`` is kept apart, ``prototypes.*`` dropped;
- ``dino``: the full checkpoint's ``teacher`` (``module.backbone.*``; its head's MLP ``head.mlp.*``, GELUs
  between, kept apart, the last layer dropped), or the backbone-only release, a torchvision state dict;
- ``timm``: a folder in the layout the Hugging Face hub holds timm models in (``config.json`` naming the
  architecture, plus ``model.safetensors`` or ``pytorch_model.bin``): any timm model, ViTs included.

The projection head, where the checkpoint has one, is what SEED distils (``teacher_space: head``):
the official SEED code loads its MoCo teacher with the ``fc`` head kept. Files are read as safetensors
or with ``weights_only=True``, so a checkpoint cannot run code. No code path downloads weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kt_edge.data.augment import MEAN, STD
from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import Backbone, at_layer, build_backbone
from kt_edge.models.checkpoint import PROJECTION, SIDECAR, load_backbone, load_projection, load_torch_file, load_weights
from kt_edge.models.heads import build_head, head_from_state
from kt_edge.models.timm_teacher import TimmTeacher, build_timm

FORMATS = ("auto", "kt-edge", "torchvision", "moco", "swav", "dino", "timm")
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MOCO_ENCODERS = ("encoder_q.", "base_encoder.")  # v1/v2, v3
DROPPED = {
    "kt-edge": (PROJECTION,),
    "torchvision": ("fc.", "classifier."),
    "moco": ("fc.",),
    "swav": ("projection_head.", "prototypes.", "fc."),
    "dino": ("head.", "fc."),
}
HEADS = {  # format -> (key prefix of the projection head's nn.Sequential, the activation between its layers)
    "kt-edge": (PROJECTION, "relu"),
    "moco": ("fc.", "relu"),
    "swav": ("projection_head.", "relu"),
    "dino": ("head.mlp.", "gelu"),
}
Teacher = tuple[nn.Module, nn.Sequential | None]  # the network, and its projection head where it has one


def import_teacher(
    path: Path | str, arch: str, image_size: int, format: str = "auto", layer: str | None = None
) -> Teacher:
    """The teacher a checkpoint holds, in eval mode: a Backbone of ``arch`` (features at ``layer``), or a timm
    model; and its projection head (None without one, or when ``layer`` takes features below the head)."""
    path = Path(path)
    if format not in FORMATS:
        raise CheckpointError(f"unknown teacher.format {format!r}; choose from {', '.join(FORMATS)}")
    if not path.exists():
        raise CheckpointError(f"teacher checkpoint not found: {path}")
    if path.is_dir():
        return _import_folder(path, image_size, format, layer)
    obj = read_checkpoint(path)
    if format == "auto":
        format = detect_format(obj)
    if format == "timm":
        raise CheckpointError(f"{path}: a timm teacher is a folder with {TIMM_CONFIG} and {TIMM_WEIGHTS[0]}")
    backbone = build_backbone(arch, image_size)
    load_weights(backbone, backbone_state(obj, format, source=str(path)), source=f"{path} (format {format})")
    if layer:
        return at_layer(backbone, layer).eval(), None
    return backbone.eval(), projection_head_of(obj, format, source=str(path))


def _import_folder(path: Path, image_size: int, format: str, layer: str | None) -> Teacher:
    if (path / SIDECAR).is_file() and format in ("auto", "kt-edge"):
        teacher, projection = load_backbone(path)[0], load_projection(path)
    elif (path / TIMM_CONFIG).is_file() and format in ("auto", "timm"):
        teacher, projection = import_timm(path, image_size), None
    else:
        raise CheckpointError(
            f"{path}: a folder teacher needs {SIDECAR} (a kt-edge checkpoint) or {TIMM_CONFIG} "
            f"(a timm model), and format auto, kt-edge or timm (got {format})"
        )
    if not layer:
        return teacher, projection
    if not isinstance(teacher, Backbone):
        raise CheckpointError(
            f"{path}: a timm teacher gives its pooled features; a teacher layer "
            f"({layer!r}) applies to resnet and alexnet backbones"
        )
    return at_layer(teacher, layer).eval(), None


def read_checkpoint(path: Path) -> object:
    """A safetensors file, or a torch pickle of tensors, containers and plain values (``weights_only=True``)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    # Official checkpoints (DINO's) store their training arguments as an argparse.Namespace:
    # a plain attribute holder, safe to allow.
    return load_torch_file(path, "checkpoint", allowed=(argparse.Namespace,))


def _unwrap(obj: object, *keys: str) -> object:
    for key in keys:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _tensors(obj: object, source: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: expected a state dict of tensors, found {type(obj).__name__}")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{source}: no tensors in the checkpoint (keys: {', '.join(map(str, list(obj)[:5]))})")
    return state


def detect_format(obj: object) -> str:
    """The format a loaded checkpoint file is in, read from its wrapper keys and parameter names."""
    if isinstance(obj, dict) and isinstance(obj.get("teacher"), dict):
        return "dino"
    state = _unwrap(obj, "state_dict", "model")
    keys = [k.removeprefix("module.") for k in state] if isinstance(state, dict) else []
    if any(k.startswith("body.") for k in keys):
        return "kt-edge"
    if any(k.startswith(MOCO_ENCODERS) for k in keys):
        return "moco"
    if any(k.startswith(("prototypes.", "projection_head.")) for k in keys):
        return "swav"
    if any(k.startswith("backbone.") for k in keys):
        return "dino"
    return "torchvision"


def _encoder_state(obj: object, format: str, source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's encoder weights under torchvision names (our ``body.`` names for kt-edge), heads included."""
    if format == "kt-edge":
        return _tensors(_unwrap(obj, "state_dict", "model"), source)
    if format == "dino":
        obj = _unwrap(obj, "teacher")
    state = _tensors(_unwrap(obj, "state_dict", "model"), source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if format == "moco":
        prefix = next((p for p in MOCO_ENCODERS if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            raise CheckpointError(
                f"{source}: no MoCo query encoder (keys starting module.encoder_q. or "
                f"module.base_encoder.); is it another format?"
            )
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    elif format == "dino":
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    return state


def backbone_state(obj: object, format: str, source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's backbone weights under our keys (``body.`` + torchvision names); heads dropped."""
    state = _encoder_state(obj, format, source)
    if format == "kt-edge":
        return {k: v for k, v in state.items() if not k.startswith(DROPPED[format])}
    return {f"body.{k}": v for k, v in state.items() if not k.startswith(DROPPED[format])}


def projection_head_of(obj: object, format: str, source: str) -> nn.Sequential | None:
    """The checkpoint's projection head, rebuilt from its parameter names, in eval mode; None without one."""
    if format not in HEADS:
        return None
    prefix, activation = HEADS[format]
    state = {k.removeprefix(prefix): v for k, v in _encoder_state(obj, format, source).items() if k.startswith(prefix)}
    if not state:
        return None
    try:
        spec, state = head_from_state(state, activation)
    except ValueError as exc:
        raise CheckpointError(f"{source}: the projection head in {prefix}* is not a plain MLP ({exc})") from None
    head = build_head(spec)
    load_weights(head, state, source=f"{source} (projection head {prefix}*)")
    return head.eval()


def import_timm(folder: Path, image_size: int) -> TimmTeacher:
    """A timm model from a hub-layout folder: ``config.json`` (architecture, pretrained_cfg) and its weights."""
    try:
        config = json.loads((folder / TIMM_CONFIG).read_text())
        arch = config["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"{folder / TIMM_CONFIG}: not a timm config ({exc.__class__.__name__}); "
            'expected at least {"architecture": ...}'
        ) from None
    cfg = config.get("pretrained_cfg", {})
    name = f"{arch}.{cfg['tag']}" if cfg.get("tag") else arch
    weights = next((folder / f for f in TIMM_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no timm weights ({' or '.join(TIMM_WEIGHTS)})")
    teacher = build_timm(name, image_size, cfg.get("mean", MEAN), cfg.get("std", STD))
    classifier = cfg.get("classifier") or "head"
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = _tensors(read_checkpoint(weights), str(weights))
    state = {f"body.{k}": v for k, v in state.items() if not k.startswith(tuple(f"{c}." for c in classifier))}
    own = teacher.state_dict()
    state.update({k: own[k] for k in ("scale", "shift", "input_hw")})
    load_weights(teacher, state, source=str(weights))
    return teacher.eval()
