"""A timm model as a teacher: any architecture timm builds, ViTs included, fed images preprocessed as kt-edge's.

timm is optional: importing this module never imports it; building a model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kt_edge.data.augment import MEAN, STD
from kt_edge.errors import CheckpointError

TIMM_PREFIX = "timm/"  # sidecar arch of an imported timm teacher: timm/<model name>


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
        raise CheckpointError(
            f"timm teacher {name!r}: a hub reference, which timm would download; kt-edge reads "
            "local files only: name the timm architecture in config.json (e.g. "
            '"vit_small_patch16_224") and keep its weights beside it'
        )
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
