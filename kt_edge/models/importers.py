"""Teachers from checkpoint files: our own, torchvision, the official MoCo / SwAV / DINO releases, and timm.

``teacher.format`` says how a checkpoint's keys map onto our backbone; ``auto`` reads the keys:

- ``kt-edge``: a folder written by ``save_backbone``, or a state dict whose keys start with ``body.``;
- ``torchvision``: a torchvision ResNet state dict (``fc.*`` dropped, a ``module.`` prefix allowed);
- ``moco``: MoCo v1/v2 (``module.encoder_q.*``) and v3 (``module.base_encoder.*``) inside ``state_dict``;
  the projection head in ``fc.*`` and the key encoder, queue and predictor are dropped;
- ``swav``: ``module.*`` with ``projection_head.*`` and ``prototypes.*`` dropped;
- ``dino``: the full checkpoint's ``teacher`` (``module.backbone.*``; ``head.*`` dropped), or the
  backbone-only release, which is a torchvision state dict;
- ``timm``: a folder in the layout the Hugging Face hub holds timm models in (``config.json`` naming the
  architecture, plus ``model.safetensors`` or ``pytorch_model.bin``): any timm model, ViTs included.

Files are read as safetensors or with ``weights_only=True``, so a checkpoint cannot run code.
No code path downloads weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kt_edge.data.augment import MEAN, STD
from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import Backbone, at_layer, build_backbone
from kt_edge.models.checkpoint import SIDECAR, TIMM_PREFIX, load_backbone, load_torch_file, load_weights

FORMATS = ("auto", "kt-edge", "torchvision", "moco", "swav", "dino", "timm")
TIMM_CONFIG = "config.json"
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MOCO_ENCODERS = ("encoder_q.", "base_encoder.")  # v1/v2, v3
DROPPED = {
    "torchvision": ("fc.", "classifier."),
    "moco": ("fc.",),
    "swav": ("projection_head.", "prototypes.", "fc."),
    "dino": ("head.", "fc."),
}


def import_teacher(path: Path | str, arch: str, image_size: int, format: str = "auto",
                   layer: str | None = None) -> nn.Module:
    """The teacher a checkpoint holds, in eval mode: a Backbone of ``arch`` (features at ``layer``), or a timm model."""
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
    return (at_layer(backbone, layer) if layer else backbone).eval()


def _import_folder(path: Path, image_size: int, format: str, layer: str | None) -> nn.Module:
    if (path / SIDECAR).is_file() and format in ("auto", "kt-edge"):
        teacher = load_backbone(path)[0]
    elif (path / TIMM_CONFIG).is_file() and format in ("auto", "timm"):
        teacher = import_timm(path, image_size)
    else:
        raise CheckpointError(f"{path}: a folder teacher needs {SIDECAR} (a kt-edge checkpoint) or {TIMM_CONFIG} "
                              f"(a timm model), and format auto, kt-edge or timm (got {format})")
    if not layer:
        return teacher
    if not isinstance(teacher, Backbone):
        raise CheckpointError(f"{path}: a timm teacher gives its pooled features; a teacher layer "
                              f"({layer!r}) applies to resnet and alexnet backbones")
    return at_layer(teacher, layer).eval()


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


def backbone_state(obj: object, format: str, source: str) -> dict[str, torch.Tensor]:
    """A checkpoint's backbone weights under our keys (``body.`` + torchvision names); heads dropped."""
    if format == "kt-edge":
        return _tensors(_unwrap(obj, "state_dict", "model"), source)
    if format == "dino":
        obj = _unwrap(obj, "teacher")
    state = _tensors(_unwrap(obj, "state_dict", "model"), source)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if format == "moco":
        prefix = next((p for p in MOCO_ENCODERS if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            raise CheckpointError(f"{source}: no MoCo query encoder (keys starting module.encoder_q. or "
                                  f"module.base_encoder.); is it another format?")
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    elif format == "dino":
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    return {f"body.{k}": v for k, v in state.items() if not k.startswith(DROPPED[format])}


class TimmTeacher(nn.Module):
    """A timm model as a teacher: takes images preprocessed as ours (``image_size``, ImageNet mean/std),
    re-normalises and resizes them to what the model was trained on, and returns its pooled features."""

    def __init__(self, name: str, image_size: int, model: nn.Module, mean, std, input_size: tuple[int, int]):
        super().__init__()
        self.arch = TIMM_PREFIX + name
        self.image_size = image_size
        self.layer = None
        self.body = model
        ours_mean, ours_std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        theirs_mean, theirs_std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        # x_theirs = (x_ours * std_ours + mean_ours - mean_theirs) / std_theirs; buffers, so saved and reloaded
        self.register_buffer("scale", ours_std / theirs_std)
        self.register_buffer("shift", (ours_mean - theirs_mean) / theirs_std)
        self.register_buffer("input_hw", torch.tensor(input_size, dtype=torch.long))
        with torch.no_grad():
            self.embed_dim = int(model.eval()(torch.zeros(1, 3, *input_size)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        size = tuple(int(v) for v in self.input_hw)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
        return self.body(x)


def build_timm(name: str, image_size: int, mean=MEAN, std=STD) -> TimmTeacher:
    """An untrained timm model (``pretrained=False``: nothing is downloaded) wrapped as a teacher.

    A name with a scheme (``hf-hub:org/model``) makes timm fetch the model's config from the hub even with
    ``pretrained=False``: refused, so no code path reaches the network.
    """
    if ":" in name:
        raise CheckpointError(f"timm teacher {name!r}: a hub reference, which timm would download; kt-edge reads "
                              "local files only: name the timm architecture in config.json (e.g. "
                              "\"vit_small_patch16_224\") and keep its weights beside it")
    try:
        import timm
    except ImportError:
        raise CheckpointError(f"timm teacher {name!r}: timm is not installed (pip install timm)") from None
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise CheckpointError(f"timm teacher: {exc}") from None
    input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[-2:])
    return TimmTeacher(name, image_size, model, mean, std, input_size)


def import_timm(folder: Path, image_size: int) -> TimmTeacher:
    """A timm model from a hub-layout folder: ``config.json`` (architecture, pretrained_cfg) and its weights."""
    try:
        config = json.loads((folder / TIMM_CONFIG).read_text())
        arch = config["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / TIMM_CONFIG}: not a timm config ({exc.__class__.__name__}); "
                              "expected at least {\"architecture\": ...}") from None
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
