"""Jigsaw puzzles (Noroozi & Favaro 2016) and Jigsaw++ (Noroozi et al. 2018).

An image becomes 3x3 tiles with gaps and jitter, shuffled by one permutation of a fixed set chosen
for large Hamming distances; one shared encoder embeds every tile, a head sees the tiles' features
side by side and classifies which permutation was applied. Jigsaw++ makes the puzzle harder and its
features better: 701 permutations at least 3 apart, and 0 to 2 tiles replaced by tiles of another
image of the batch, so the permutation must be read from the tiles that remain (a distance of 3
keeps it identifiable with 2 tiles replaced). The Backbone handed on is the tile encoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from kt_edge.models.backbones import Backbone
from kt_edge.teachers.tiles import (
    CELLS,
    PuzzleCrop,
    TileHead,
    check_tile,
    cut_grid,
    default_tile,
    embed_tiles,
    geometry,
    hamming_permutations,
    normalize_tiles,
)


class JigsawOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    permutations: int = Field(default=100, ge=2, le=10_000, description="classes: the permutation set's size")
    min_hamming: int = Field(default=1, ge=1, le=CELLS, description="least Hamming distance between permutations")
    replace: int = Field(default=0, ge=0, le=CELLS - 1, description="up to this many tiles come from another image")
    grayscale: float = Field(default=0.3, ge=0, le=1, description="probability of a grey puzzle (colour shortcuts)")
    tile: int | None = Field(default=None, ge=8, description="tile side in px; unset: 64/225 of the image, >= 16")
    gap: float = Field(default=0.17, ge=0, le=2, description="space between tiles, as a fraction of the tile")
    jitter: float = Field(default=0.085, ge=0, le=1, description="random shift of each tile, fraction of the tile")
    tile_norm: bool = Field(default=True, description="normalise every tile to its own mean and std")
    tile_dim: int = Field(default=512, ge=8, description="per-tile layer (fc6) width")
    hidden: int = Field(default=4096, ge=8, description="joint layer (fc7) width")

    @model_validator(mode="after")
    def _identifiable(self):
        if self.replace >= self.min_hamming:
            raise ValueError(
                f"teacher.options.replace {self.replace} needs min_hamming above it ({self.min_hamming}): "
                "with that many tiles replaced two permutations of the set could look the same"
            )
        return self


class JigsawPPOptions(JigsawOptions):
    permutations: int = Field(default=701, ge=2, le=10_000)
    min_hamming: int = Field(default=3, ge=1, le=CELLS)
    replace: int = Field(default=2, ge=0, le=CELLS - 1)
    grayscale: float = Field(default=0.7, ge=0, le=1)


class JigsawView:
    """PIL image -> (tiles [9, C, t, t] in permuted order, permutation index, donor slots [9]).

    Slot i holds tile ``perms[label][i]`` of the row-major grid. ``donors[i] >= 0`` marks a slot whose tile
    ``swap_in_donors`` replaces by the donor image's tile in slot ``donors[i]``; -1 keeps it.
    """

    def __init__(self, perms: np.ndarray, tile: int, side: int, jitter: int, opts: JigsawOptions):
        self.crop = PuzzleCrop(side, opts.grayscale)
        self.perms = torch.from_numpy(np.array(perms))
        self.tile, self.jitter, self.replace, self.tile_norm = tile, jitter, opts.replace, opts.tile_norm

    def __call__(self, image):
        return self.shuffle(self.crop(image))

    def shuffle(self, puzzle: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        tiles, _ = cut_grid(puzzle, self.tile, self.jitter)
        tiles = normalize_tiles(tiles, self.tile_norm)
        label = int(torch.randint(len(self.perms), ()))
        donors = torch.full((CELLS,), -1, dtype=torch.long)
        replaced = int(torch.randint(self.replace + 1, ()))
        if replaced:
            donors[torch.randperm(CELLS)[:replaced]] = torch.randint(CELLS, (replaced,))
        return tiles[self.perms[label]], label, donors


def swap_in_donors(tiles: torch.Tensor, donors: torch.Tensor) -> torch.Tensor:
    """Replace the marked slots of image i with tiles of image i-1 of the batch (a random other image, the
    batch being shuffled): tiles [B, 9, C, t, t], donors [B, 9] (-1: keep; j: take the donor's slot j)."""
    donor_tiles = tiles.roll(1, dims=0)
    picked = donor_tiles[torch.arange(len(tiles), device=tiles.device)[:, None], donors.clamp(min=0)]
    return torch.where((donors >= 0)[:, :, None, None, None], picked, tiles)


class Jigsaw(nn.Module):
    """Jigsaw puzzles (Noroozi & Favaro 2016): classify which of a set of tile permutations was applied."""

    Options = JigsawOptions

    def __init__(self, backbone: Backbone, options: dict, n_images: int):
        super().__init__()
        self.opts = self.Options(**options)
        self.tile = self.opts.tile or default_tile(backbone.image_size)
        check_tile(backbone, self.tile, "teacher.options.tile")
        self.backbone = backbone
        self.head = TileHead(backbone.embed_dim, CELLS, self.opts.tile_dim, self.opts.hidden, self.opts.permutations)
        perms = hamming_permutations(self.opts.permutations, self.opts.min_hamming)
        self.register_buffer("perms", torch.from_numpy(np.array(perms)))  # saved with the resume state

    def train_transform(self, image_size: int) -> JigsawView:
        _, side, jitter = geometry(self.tile, self.opts.gap, self.opts.jitter)
        return JigsawView(self.perms.cpu().numpy(), self.tile, side, jitter, self.opts)

    def training_step(self, batch):
        (tiles, labels, donors), _ = batch  # tiles: B x 9 x C x t x t, labels: B, donors: B x 9
        if self.opts.replace:
            tiles = swap_in_donors(tiles, donors)
        logits = self.head(embed_tiles(self.backbone, tiles)).float()  # B x permutations
        return {"loss": F.cross_entropy(logits, labels), "accuracy": (logits.argmax(1) == labels).float().mean()}

    def after_step(self, step: int, total: int) -> None:
        """Nothing moves after the optimiser's step: no momentum encoder, no queue."""


class JigsawPP(Jigsaw):
    """Jigsaw++ (Noroozi et al. 2018): 701 permutations 3 apart, up to 2 tiles from other images, 70% grey."""

    Options = JigsawPPOptions
