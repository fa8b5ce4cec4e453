"""Rotation prediction (Gidaris, Singh & Komodakis 2018): which of 0, 90, 180, 270 degrees was applied?

Every image of the batch is shown in all four rotations at once (the paper found this better than
one random rotation per image), and a linear layer on the pooled features classifies the rotation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchvision import transforms as T

from kt_edge.data.augment import MEAN, STD
from kt_edge.models.backbones import Backbone

ROTATIONS = 4


class RotationOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(default=0, ge=0, description="hidden layer width of the classifier; 0: linear, as the paper")
    crop_scale: float = Field(default=0.5, gt=0, le=1, description="smallest random crop, as a fraction of the image")


def rotate_batch(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> the batch rotated by k * 90 degrees counter-clockwise for k = 0..3 [4B, C, H, W], labels k."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return rotated, labels


class Rotation(nn.Module):
    """Rotation prediction (Gidaris et al. 2018): 4-way classification of the rotation applied."""

    Options = RotationOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = RotationOptions(**options)
        self.backbone = backbone
        dim = backbone.embed_dim
        self.head = (
            nn.Linear(dim, ROTATIONS)
            if not self.opts.hidden
            else nn.Sequential(
                nn.Linear(dim, self.opts.hidden), nn.ReLU(inplace=True), nn.Linear(self.opts.hidden, ROTATIONS)
            )
        )

    def train_transform(self, image_size: int) -> T.Compose:
        """Square crops (so every rotation has the same shape) and flips; no colour change is needed."""
        return T.Compose(
            [
                T.RandomResizedCrop(image_size, scale=(self.opts.crop_scale, 1.0), ratio=(1.0, 1.0), antialias=True),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )

    def training_step(self, batch):
        images, _ = batch  # B x 3 x S x S
        rotated, labels = rotate_batch(images)  # 4B x 3 x S x S, 4B
        logits = self.head(self.backbone(rotated)).float()  # 4B x 4
        return {"loss": F.cross_entropy(logits, labels), "accuracy": (logits.argmax(1) == labels).float().mean()}

    def after_step(self, step: int, total: int) -> None:
        """Nothing moves after the optimiser's step: no momentum encoder, no queue."""
