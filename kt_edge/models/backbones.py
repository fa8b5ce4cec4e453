"""torchvision backbones that output a pooled embedding, with small-image variants.

Images of 64 px and below get the CIFAR stem (3x3 stride-1 first conv, no max-pool) for ResNets
and a stride-1 first conv for AlexNet, so 32 px inputs still leave spatial maps to learn from.
MobileNetV3 and EfficientNet-B0 (the Jetson-class students SEED reports) downsample 32x, which
leaves 32 px inputs a 1x1 map after their fourth block: their small-image variant drops the stride
of the stem and of the first downsampling block, so they end at stride 8 (4x4 at 32 px) like the
CIFAR ResNet. Their embedding is the pooled output of the last conv (960, 576 and 1280 wide); the
classifier above it is not built into the backbone.

``layer`` picks the stage whose pooled output is the embedding (default: the last stage): pretext
teachers such as Jigsaw often have their most transferable features below the last conv.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

MOBILE = ("mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0")
ARCHS = ("resnet18", "resnet50", "alexnet", *MOBILE)
STUDENTS = ("resnet18", "alexnet", *MOBILE)  # distill.student
SMALL_IMAGE = 64
RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
ALEXNET_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
# torchvision's MobileNetV3 keeps TensorFlow's BatchNorm momentum of 0.01, tuned for 600-epoch ImageNet runs:
# after a 60-step run its running statistics would still weigh their initial values by 0.99**60 = 55%.
# 0.1, PyTorch's default and the ResNets', lets eval-mode statistics follow the short runs students get.
BATCHNORM_MOMENTUM = 0.1


class Backbone(nn.Module):
    """``forward(x) -> [N, embed_dim]`` pooled features; the thing teachers give and students learn."""

    def __init__(self, arch: str, image_size: int, body: nn.Module, embed_dim: int, layer: str | None = None):
        super().__init__()
        self.arch = arch
        self.image_size = image_size
        self.embed_dim = embed_dim
        self.layer = layer  # None: the last stage
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def layers_of(arch: str) -> tuple[str, ...]:
    """The stage names ``build_backbone(..., layer=)`` accepts for ``arch``, first to last (none for the
    mobile students: a student learns its embedding at the top, there is no lower stage to pick)."""
    if arch in MOBILE:
        return ()
    return ALEXNET_LAYERS if arch == "alexnet" else RESNET_LAYERS


def build_backbone(arch: str, image_size: int, layer: str | None = None) -> Backbone:
    """A randomly initialised backbone; ``layer`` names the stage whose pooled output is the embedding."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if layer is not None and layer not in layers_of(arch):
        choices = ", ".join(layers_of(arch)) or "none: its embedding is its last stage's"
        raise ValueError(f"unknown layer {layer!r} for {arch}; choose from {choices}")
    if layers_of(arch) and layer == layers_of(arch)[-1]:
        layer = None  # the default, spelled out: same network, same checkpoint
    small = image_size <= SMALL_IMAGE
    if arch in MOBILE:
        features = _mobile_features(arch, small)
        body = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return Backbone(arch, image_size, body, _last_conv(features).out_channels)
    if arch in ("resnet18", "resnet50"):
        net = getattr(models, arch)(weights=None)
        if small:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        embed_dim = net.fc.in_features
        net.fc = nn.Identity()
        if layer is not None:
            last = RESNET_LAYERS.index(layer)
            for name in RESNET_LAYERS[last + 1 :]:
                setattr(net, name, nn.Identity())
            embed_dim = _last_conv(getattr(net, layer)).out_channels
        return Backbone(arch, image_size, net, embed_dim, layer)
    features = _alexnet_features()
    if small:
        features[0] = nn.Conv2d(3, 64, kernel_size=5, stride=1, padding=2)
    features = _with_batchnorm(features)
    if layer is not None:
        features = features[: _alexnet_stage_end(features, ALEXNET_LAYERS.index(layer))]
    body = nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(arch, image_size, body, _last_conv(features).out_channels, layer)


def at_layer(backbone: Backbone, layer: str | None) -> Backbone:
    """The same trained weights with the embedding taken at ``layer`` (the stages above it dropped)."""
    out = build_backbone(backbone.arch, backbone.image_size, layer)
    keep = out.state_dict().keys()
    out.load_state_dict({k: v for k, v in backbone.state_dict().items() if k in keep})
    return out.train(backbone.training)


def _mobile_features(arch: str, small: bool) -> nn.Sequential:
    """torchvision's MobileNetV3 / EfficientNet-B0 conv stages; for small images the stem and the first
    downsampling block run at stride 1 (that block then has no residual either way: its widths differ,
    or, in MobileNetV3-Small, torchvision decided it at build time from the stride of 2)."""
    features = getattr(models, arch)(weights=None).features
    if small:
        strided = [m for m in features.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
        for conv in strided[:2]:
            conv.stride = (1, 1)
    for module in features.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = BATCHNORM_MOMENTUM
    return features


def _alexnet_features() -> nn.Sequential:
    """torchvision AlexNet's conv layers, built without allocating its unused 58M-parameter classifier."""
    with torch.device("meta"):
        features = models.alexnet(weights=None).features
    features = features.to_empty(device="cpu")
    for module in features.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()  # AlexNet has no init of its own beyond each layer's default
    return features


def _alexnet_stage_end(features: nn.Sequential, stage: int) -> int:
    """Index just past conv ``stage``'s ReLU, and past its max-pool where one follows (pool1, 2, 5)."""
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    end = convs[stage] + 3  # conv, BatchNorm, ReLU
    return end + 1 if end < len(features) and isinstance(features[end], nn.MaxPool2d) else end


def _last_conv(module: nn.Module) -> nn.Conv2d:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1]


def _with_batchnorm(features: nn.Sequential) -> nn.Sequential:
    """AlexNet with BatchNorm after every conv, as the self-supervised AlexNets of CompRess and
    Noroozi et al. use: without it a randomly initialised AlexNet barely trains."""
    layers = []
    for layer in features:
        layers.append(layer)
        if isinstance(layer, nn.Conv2d):
            layers.append(nn.BatchNorm2d(layer.out_channels))
    return nn.Sequential(*layers)
