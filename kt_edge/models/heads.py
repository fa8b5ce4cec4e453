"""Projection heads: the MLPs the joint-embedding methods put on a backbone, built, described and rebuilt.

One builder serves every method (MoCo v2 / SEED: Linear-ReLU-Linear; SimCLR, BYOL: a BatchNorm after
the hidden layer; Barlow Twins: three bias-free layers). A head is saved with its teacher as a *spec*,
a list of layers, so it can be rebuilt without the method's code, and an imported MoCo, SwAV or DINO
checkpoint's head is read into the same form from its parameter names: SEED distils the teacher's
projection output, as the official SEED code loads its MoCo teacher with its ``fc`` head.
"""

from __future__ import annotations

import re

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def projection_head(
    in_dim: int, hidden: int, out_dim: int, layers: int = 2, batchnorm: bool = False, bias: bool = True
) -> nn.Sequential:
    """``layers`` Linear layers with ReLU between them (BatchNorm before each ReLU when ``batchnorm``)."""
    blocks, width = [], in_dim
    for _ in range(layers - 1):
        blocks.append(nn.Linear(width, hidden, bias=bias))
        if batchnorm:
            blocks.append(nn.BatchNorm1d(hidden))
        blocks.append(nn.ReLU(inplace=True))
        width = hidden
    blocks.append(nn.Linear(width, out_dim, bias=bias))
    return nn.Sequential(*blocks)


def head_spec(head: nn.Sequential) -> list[dict]:
    """The layers of a head as JSON: linear (in, out, bias), batchnorm (dim, affine), relu or gelu."""
    spec = []
    for layer in head:
        if isinstance(layer, nn.Linear):
            spec.append(
                {"type": "linear", "in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}
            )
        elif isinstance(layer, nn.BatchNorm1d):
            spec.append({"type": "batchnorm", "dim": layer.num_features, "affine": layer.affine})
        elif type(layer) in ACTIVATIONS.values():
            spec.append({"type": next(k for k, v in ACTIVATIONS.items() if type(layer) is v)})
        else:
            raise ValueError(f"a projection head of Linear, BatchNorm1d, ReLU and GELU layers has no {layer!r}")
    return spec


def build_head(spec: list[dict]) -> nn.Sequential:
    """The untrained head a spec describes (the inverse of ``head_spec``)."""
    layers = []
    for item in spec:
        kind = item["type"]
        if kind == "linear":
            layers.append(nn.Linear(item["in"], item["out"], bias=item["bias"]))
        elif kind == "batchnorm":
            layers.append(nn.BatchNorm1d(item["dim"], affine=item["affine"]))
        elif kind in ACTIVATIONS:
            layers.append(ACTIVATIONS[kind]())
        else:
            raise ValueError(f"unknown projection-head layer {kind!r}")
    return nn.Sequential(*layers)


def out_dim(spec: list[dict]) -> int:
    return next(item["out"] for item in reversed(spec) if item["type"] == "linear")


def head_from_state(state: dict[str, torch.Tensor], activation: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The spec and weights of a head stored as an ``nn.Sequential`` (keys ``<i>.weight``, ...) or as a single
    Linear (``weight``, ``bias``: MoCo v1's fc); the indices without parameters are ``activation`` layers."""
    if set(state) <= {"weight", "bias"}:
        state = {f"0.{k}": v for k, v in state.items()}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = re.fullmatch(r"(\d+)\.(\w+)", key)
        if match is None:
            raise ValueError(f"projection-head key {key!r} is not <layer index>.<name>")
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = value
    spec = []
    for index in range(max(layers) + 1):
        params = layers.get(index)
        if params is None:
            spec.append({"type": activation})
        elif "running_mean" in params:
            spec.append({"type": "batchnorm", "dim": len(params["running_mean"]), "affine": "weight" in params})
        elif params.get("weight") is not None and params["weight"].ndim == 2:
            out_features, in_features = params["weight"].shape
            spec.append({"type": "linear", "in": in_features, "out": out_features, "bias": "bias" in params})
        else:
            raise ValueError(f"projection-head layer {index} is neither Linear nor BatchNorm1d: {sorted(params)}")
    return spec, state
