"""Tiles for the spatial pretext tasks: Jigsaw, Jigsaw++ and relative patch location.

An image is cropped to a square *puzzle* and cut into a 3x3 grid of cells. Each tile sits in the
middle of its cell, shifted by a random jitter, so neighbouring tiles are separated by a gap and
never line up exactly: the network cannot solve the task by continuing edges or textures across
tile borders (Doersch et al. 2015; Noroozi & Favaro 2016). Tiles are small images that one
shared encoder (the Backbone the stage hands on) embeds one by one.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from kt_edge import atomic
from kt_edge.data.augment import MEAN, STD
from kt_edge.errors import RecipeError
from kt_edge.models.backbones import Backbone

GRID = 3
CELLS = GRID * GRID
MIN_TILE = 16  # AlexNet's three max-pools need about 15 px; below that tiles carry too little to learn from
CACHE_ENV = "KT_EDGE_CACHE"


def default_tile(image_size: int) -> int:
    """Tile side for an image size: Noroozi & Favaro's 64 px tiles of 225 px crops, at least MIN_TILE."""
    return max(MIN_TILE, round(image_size * 64 / 225))


def geometry(tile: int, gap: float, jitter: float) -> tuple[int, int, int]:
    """(cell, puzzle side, jitter) in pixels for a tile side and a gap and jitter given as fractions of it."""
    cell = tile + round(gap * tile)
    return cell, GRID * cell, min(round(jitter * tile), (cell - tile) // 2)


def check_tile(backbone: Backbone, tile: int, key: str) -> None:
    """Refuse a tile the encoder cannot embed (AlexNet's pools shrink tiny tiles to nothing) up front."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, tile, tile))
    except RuntimeError as exc:
        raise RecipeError(
            f"{key} {tile}: {backbone.arch} cannot embed {tile}x{tile} tiles "
            f"({str(exc).splitlines()[0]}); set a larger {key}"
        ) from None
    finally:
        backbone.train(was_training)


class PuzzleCrop:
    """PIL image -> [3, side, side] float tensor in [0, 1]: a random square crop, grey with probability p."""

    def __init__(self, side: int, grayscale: float, scale: tuple[float, float] = (0.6, 1.0)):
        self.transform = T.Compose(
            [
                T.RandomResizedCrop(side, scale=scale, ratio=(1.0, 1.0), antialias=True),
                T.RandomGrayscale(p=grayscale),
                T.ToTensor(),
            ]
        )

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)


def cut_grid(puzzle: torch.Tensor, tile: int, jitter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3x3 tiles of a puzzle [C, S, S], row-major, as [9, C, tile, tile], and their top-left corners [9, 2].

    Each tile is centred in its cell and shifted by up to ``jitter`` pixels along each axis.
    """
    cell = puzzle.shape[-1] // GRID
    if tile > cell:
        raise ValueError(f"tile {tile} does not fit a {cell} px cell of a {puzzle.shape[-1]} px puzzle")
    centre = (cell - tile) // 2
    shift = torch.randint(-jitter, jitter + 1, (CELLS, 2)) if jitter else torch.zeros(CELLS, 2, dtype=torch.long)
    grid = torch.tensor([(r * cell, c * cell) for r in range(GRID) for c in range(GRID)])
    corners = grid + (centre + shift).clamp(0, cell - tile)
    tiles = torch.stack([puzzle[:, y : y + tile, x : x + tile] for y, x in corners.tolist()])
    return tiles, corners


def normalize_tiles(tiles: torch.Tensor, per_tile: bool) -> torch.Tensor:
    """Per-tile, per-channel zero mean and unit std (so tiles cannot be matched by colour or brightness),
    or the dataset normalisation the encoder sees at evaluation."""
    if not per_tile:
        return TF.normalize(tiles, MEAN, STD)
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True)
    return (tiles - mean) / std.clamp_min(1e-3)


class TileHead(nn.Module):
    """The context-free network's top: a shared layer per tile, the tiles concatenated, then a classifier."""

    def __init__(self, embed_dim: int, tiles: int, tile_dim: int, hidden: int, classes: int):
        super().__init__()
        self.per_tile = nn.Sequential(nn.Linear(embed_dim, tile_dim), nn.ReLU(inplace=True))
        self.joint = nn.Sequential(
            nn.Linear(tiles * tile_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[B, tiles, embed_dim] -> [B, classes] logits."""
        return self.joint(self.per_tile(features).flatten(1))


def embed_tiles(backbone: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """[B, n, C, t, t] -> [B, n, embed_dim]: every tile through the one shared encoder."""
    batch, n = tiles.shape[:2]
    return backbone(tiles.flatten(0, 1)).view(batch, n, -1)


def min_hamming(perms: np.ndarray) -> int:
    """The smallest number of positions in which two rows of ``perms`` differ."""
    diff = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    np.fill_diagonal(diff, perms.shape[1] + 1)
    return int(diff.min())


def _greedy_permutations(count: int) -> np.ndarray:
    """Noroozi & Favaro's algorithm 1, maximin form: start from the identity, then keep adding the permutation
    farthest (in minimum, then total, Hamming distance) from those chosen. Deterministic."""
    candidates = np.array(list(itertools.permutations(range(CELLS))), dtype=np.uint8)
    columns = np.ascontiguousarray(candidates.T)
    nearest = np.full(len(candidates), CELLS + 1, dtype=np.int32)
    total = np.zeros(len(candidates), dtype=np.int32)
    distance = np.empty(len(candidates), dtype=np.int32)
    same = np.empty(len(candidates), dtype=bool)
    key = np.empty(len(candidates), dtype=np.int32)
    chosen = [0]
    for _ in range(count - 1):
        distance.fill(CELLS)
        for position, value in enumerate(candidates[chosen[-1]]):
            np.equal(columns[position], value, out=same)
            distance -= same
        np.minimum(nearest, distance, out=nearest)
        total += distance
        np.multiply(nearest, CELLS * count + 1, out=key)  # rank by nearest first, total second
        key += total
        chosen.append(int(np.argmax(key)))
    return candidates[chosen].astype(np.int64)


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kt_edge").expanduser()


@functools.lru_cache(maxsize=8)
def hamming_permutations(count: int, min_distance: int = 1) -> np.ndarray:
    """``count`` permutations of the 9 tiles, far apart in Hamming distance and at least ``min_distance``.

    Computed once (a few seconds for 1000), then read from ``$KT_EDGE_CACHE`` (default ~/.cache/kt_edge)
    and memoised; a cached file that fails the checks is recomputed.
    """
    if not 1 <= count <= 10_000:
        raise RecipeError(f"permutations {count}: choose between 1 and 10000")
    path = _cache_dir() / f"jigsaw-permutations-{count}.npy"
    perms = None
    try:
        perms = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        pass
    if not _valid(perms, count):
        perms = _greedy_permutations(count)
        try:
            with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.save(handle, perms)
        except OSError:
            pass  # a read-only home only costs the recomputation next time
    if count > 1 and min_hamming(perms) < min_distance:
        raise RecipeError(
            f"no set of {count} permutations with minimum Hamming distance {min_distance} found "
            f"(the greedy set reaches {min_hamming(perms)}); ask for fewer permutations"
        )
    perms.setflags(write=False)
    return perms


def _valid(perms: np.ndarray | None, count: int) -> bool:
    return (
        perms is not None
        and perms.shape == (count, CELLS)
        and perms.dtype == np.int64
        and bool((np.sort(perms, axis=1) == np.arange(CELLS)).all())
        and len(np.unique(perms, axis=0)) == count
    )
