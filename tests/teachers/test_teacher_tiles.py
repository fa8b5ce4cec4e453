"""The shared tile sampler: permutation sets, grid geometry, per-tile normalisation, tile-size checks."""

import numpy as np
import pytest
import torch
from teacher_kit import coordinate_puzzle

from kt_edge.errors import RecipeError
from kt_edge.models.backbones import build_backbone
from kt_edge.teachers import tiles
from kt_edge.teachers.tiles import (
    check_tile,
    cut_grid,
    default_tile,
    geometry,
    hamming_permutations,
    min_hamming,
    normalize_tiles,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    hamming_permutations.cache_clear()
    yield
    hamming_permutations.cache_clear()


def test_permutations_are_distinct_far_apart_deterministic_and_cached(tmp_path):
    perms = hamming_permutations(100)
    assert perms.shape == (100, 9)
    assert (np.sort(perms, axis=1) == np.arange(9)).all()  # every row is a permutation of the 9 tiles
    assert len(np.unique(perms, axis=0)) == 100
    assert min_hamming(perms) >= 6  # maximin keeps even the closest pair 6 tiles apart
    cached = tmp_path / "cache" / "jigsaw-permutations-100.npy"
    assert np.array_equal(np.load(cached), perms)
    hamming_permutations.cache_clear()
    cached.unlink()
    assert np.array_equal(hamming_permutations(100), perms)  # recomputed: the same set


def test_jigsaw_pp_set_has_701_permutations_at_least_3_apart():
    perms = hamming_permutations(701, min_distance=3)
    assert perms.shape == (701, 9) and len(np.unique(perms, axis=0)) == 701
    assert min_hamming(perms) >= 3


def test_a_corrupt_cache_file_is_recomputed(tmp_path):
    expected = hamming_permutations(30)
    hamming_permutations.cache_clear()
    np.save(tmp_path / "cache" / "jigsaw-permutations-30.npy", np.zeros((30, 9), dtype=np.int64))
    assert np.array_equal(hamming_permutations(30), expected)


def test_an_impossible_distance_is_refused():
    with pytest.raises(RecipeError, match="minimum Hamming distance 9"):
        hamming_permutations(40, min_distance=9)  # at most 9 permutations of 9 tiles differ everywhere


def test_tiles_sit_in_their_own_cells_with_gap_and_jitter():
    tile = 16
    cell, side, jitter = geometry(tile, gap=0.5, jitter=0.2)
    assert (cell, side, jitter) == (24, 72, 3)
    puzzle = coordinate_puzzle(side)
    torch.manual_seed(0)
    shifts = set()
    for _ in range(20):
        cut, corners = cut_grid(puzzle, tile, jitter)
        assert cut.shape == (9, 3, tile, tile)
        for k, (y, x) in enumerate(corners.tolist()):
            assert torch.equal(cut[k], puzzle[:, y : y + tile, x : x + tile])
            row, col = divmod(k, 3)
            offset_y, offset_x = y - row * cell, x - col * cell
            assert abs(offset_y - 4) <= jitter and abs(offset_x - 4) <= jitter  # centred, then jittered
            shifts.add((offset_y, offset_x))
    assert len(shifts) > 5  # the jitter really moves tiles


def test_default_tile_follows_the_paper_ratio_with_a_floor():
    assert default_tile(225) == 64
    assert default_tile(32) == 16


def test_per_tile_normalisation_gives_zero_mean_unit_std():
    tiles_ = torch.rand(9, 3, 16, 16) * 0.3 + 0.5
    out = normalize_tiles(tiles_, per_tile=True)
    assert torch.allclose(out.mean(dim=(-2, -1)), torch.zeros(9, 3), atol=1e-5)
    assert torch.allclose(out.std(dim=(-2, -1)), torch.ones(9, 3), atol=1e-4)
    flat = normalize_tiles(torch.full((1, 3, 16, 16), 0.4), per_tile=True)
    assert torch.isfinite(flat).all() and flat.abs().max() < 1e-3  # a flat tile does not divide by zero


def test_a_tile_too_small_for_the_encoder_is_refused_with_the_key():
    with pytest.raises(RecipeError, match="teacher.options.tile 8: alexnet cannot embed 8x8 tiles"):
        check_tile(build_backbone("alexnet", 32), 8, "teacher.options.tile")
    check_tile(build_backbone("resnet18", 32), 8, "teacher.options.tile")  # ResNets pool adaptively
