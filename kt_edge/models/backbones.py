"""torchvision backbones that output a pooled embedding, with small-image variants.

Images of 64 px and below get the CIFAR stem (3x3 stride-1 first conv, no max-pool) for ResNets
and a stride-1 first conv for AlexNet, so 32 px inputs still leave spatial maps to learn from.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

ARCHS = ("resnet18", "resnet50", "alexnet")
SMALL_IMAGE = 64


class Backbone(nn.Module):
    """``forward(x) -> [N, embed_dim]`` pooled features; the thing teachers give and students learn."""

    def __init__(self, arch: str, image_size: int, body: nn.Module, embed_dim: int):
        super().__init__()
        self.arch = arch
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def build_backbone(arch: str, image_size: int) -> Backbone:
    small = image_size <= SMALL_IMAGE
    if arch in ("resnet18", "resnet50"):
        net = getattr(models, arch)(weights=None)
        if small:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        return Backbone(arch, image_size, net, embed_dim)
    if arch == "alexnet":
        features = models.alexnet(weights=None).features
        if small:
            features[0] = nn.Conv2d(3, 64, kernel_size=5, stride=1, padding=2)
        body = nn.Sequential(_with_batchnorm(features), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return Backbone(arch, image_size, body, 256)
    raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")


def _with_batchnorm(features: nn.Sequential) -> nn.Sequential:
    """AlexNet with BatchNorm after every conv, as the self-supervised AlexNets of CompRess and
    Noroozi et al. use: without it a randomly initialised AlexNet barely trains."""
    layers = []
    for layer in features:
        layers.append(layer)
        if isinstance(layer, nn.Conv2d):
            layers.append(nn.BatchNorm2d(layer.out_channels))
    return nn.Sequential(*layers)


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """The MoCo v2 / SEED projection head: Linear-ReLU-Linear (BN-free, as in the official code)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
