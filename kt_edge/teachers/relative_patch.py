"""Relative patch location (Doersch, Gupta & Efros 2015): where does the second patch sit around the first?

A central patch and one of its 8 neighbours are cut from a 3x3 grid with a gap of half a patch and a
few pixels of jitter; one shared encoder embeds both, and a head classifies the neighbour's position
(8-way). Colour dropping (keep one random channel, replace the other two by faint noise) removes the
chromatic-aberration shortcut the paper found. The Backbone handed on is the patch encoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kt_edge.models.backbones import Backbone
from kt_edge.teachers.tiles import (
    GRID,
    PuzzleCrop,
    TileHead,
    check_tile,
    cut_grid,
    default_tile,
    embed_tiles,
    geometry,
    normalize_tiles,
)

CENTRE = (GRID * GRID) // 2
# (row, column) step from the centre patch to the neighbour, per label: row-major around the centre.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


class RelativePatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tile: int | None = Field(default=None, ge=8, description="patch side in px; unset: 64/225 of the image, >= 16")
    gap: float = Field(default=0.5, ge=0, le=2, description="space between patches, as a fraction of the patch")
    jitter: float = Field(default=0.075, ge=0, le=1, description="random shift of each patch, fraction of the patch")
    color_drop: bool = Field(default=True, description="keep one random colour channel, noise in the others")
    tile_dim: int = Field(default=512, ge=8, description="per-patch layer (fc6) width")
    hidden: int = Field(default=4096, ge=8, description="joint layer (fc7) width")


def drop_colours(patches: torch.Tensor) -> torch.Tensor:
    """Per patch [.., 3, t, t]: keep one random channel; the others become noise of 1/100 of its std."""
    keep = torch.randint(3, patches.shape[:-3])
    kept = patches.gather(-3, keep[..., None, None, None].expand(*patches.shape[:-3], 1, *patches.shape[-2:]))
    noise = torch.randn_like(patches) * kept.std(dim=(-3, -2, -1), keepdim=True) / 100
    channel = torch.arange(3)[None, :, None, None]
    return torch.where(channel == keep[..., None, None, None], patches, noise)


class PatchPairView:
    """PIL image -> (patches [2, C, t, t]: centre then neighbour, label: the neighbour's index in NEIGHBOURS)."""

    def __init__(self, tile: int, side: int, jitter: int, color_drop: bool):
        self.crop = PuzzleCrop(side, grayscale=0.0)
        self.tile, self.jitter, self.color_drop = tile, jitter, color_drop

    def __call__(self, image):
        return self.pair(self.crop(image))

    def pair(self, puzzle: torch.Tensor) -> tuple[torch.Tensor, int]:
        label = int(torch.randint(len(NEIGHBOURS), ()))
        row, col = NEIGHBOURS[label]
        tiles, _ = cut_grid(puzzle, self.tile, self.jitter)
        patches = normalize_tiles(tiles[[CENTRE, CENTRE + row * GRID + col]], per_tile=False)
        return (drop_colours(patches) if self.color_drop else patches), label


class RelativePatch(nn.Module):
    """Relative patch location (Doersch et al. 2015): 8-way position of a patch next to a central one."""

    Options = RelativePatchOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = RelativePatchOptions(**options)
        self.tile = self.opts.tile or default_tile(backbone.image_size)
        check_tile(backbone, self.tile, "teacher.options.tile")
        self.backbone = backbone
        self.head = TileHead(backbone.embed_dim, 2, self.opts.tile_dim, self.opts.hidden, len(NEIGHBOURS))

    def train_transform(self, image_size: int) -> PatchPairView:
        _, side, jitter = geometry(self.tile, self.opts.gap, self.opts.jitter)
        return PatchPairView(self.tile, side, jitter, self.opts.color_drop)

    def training_step(self, batch):
        (patches, labels), _ = batch  # patches: B x 2 x C x t x t (centre, neighbour), labels: B
        logits = self.head(embed_tiles(self.backbone, patches)).float()  # B x 8
        return {"loss": F.cross_entropy(logits, labels), "accuracy": (logits.argmax(1) == labels).float().mean()}

    def after_step(self, step: int, total: int) -> None:
        """Nothing moves after the optimiser's step: no momentum encoder, no queue."""
