"""Jigsaw and Jigsaw++: the labelled permutation undone rebuilds the puzzle; tiles from other images; the loss falls."""

import pytest
import torch
from sample_kit import SAMPLE, fixed_batch, sample_images, train_steps
from teacher_kit import coordinate_puzzle
from torchvision.transforms import functional as TF

from kt_edge.data.augment import MEAN, STD
from kt_edge.errors import RecipeError
from kt_edge.models.backbones import build_backbone
from kt_edge.recipe import recipe_from_dict
from kt_edge.teachers import tiles
from kt_edge.teachers.jigsaw import Jigsaw, JigsawPP, swap_in_donors

HEAD = {"tile_dim": 32, "hidden": 64}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    tiles.hamming_permutations.cache_clear()
    yield
    tiles.hamming_permutations.cache_clear()


def unshuffle(shuffled: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Slot i holds grid tile perm[i]: put every tile back at its grid position."""
    grid = torch.empty_like(shuffled)
    grid[perm] = shuffled
    return grid


def stitch(grid_tiles: torch.Tensor) -> torch.Tensor:
    """9 row-major tiles [9, C, t, t] side by side -> [C, 3t, 3t]."""
    rows = [torch.cat(list(grid_tiles[r * 3 : (r + 1) * 3]), dim=-1) for r in range(3)]
    return torch.cat(rows, dim=-2)


def test_undoing_the_labelled_permutation_rebuilds_the_image():
    method = Jigsaw(
        build_backbone("alexnet", 32),
        {"permutations": 24, "gap": 0, "jitter": 0, "tile_norm": False, **HEAD},
        n_images=8,
    )
    view = method.train_transform(32)
    puzzle = torch.rand(3, 3 * method.tile, 3 * method.tile)
    torch.manual_seed(0)
    labels = set()
    for _ in range(10):
        shuffled, label, donors = view.shuffle(puzzle)
        labels.add(label)
        assert (donors == -1).all()  # plain Jigsaw replaces nothing
        assert torch.allclose(stitch(unshuffle(shuffled, method.perms[label])), TF.normalize(puzzle, MEAN, STD))
        if label != 0:  # permutation 0 is the identity
            assert not torch.allclose(stitch(shuffled), TF.normalize(puzzle, MEAN, STD))
    assert len(labels) > 5


def test_with_gaps_and_jitter_every_tile_returns_to_its_own_cell():
    method = Jigsaw(
        build_backbone("alexnet", 32),
        {"permutations": 24, "tile_norm": False, "gap": 0.5, "jitter": 0.2, **HEAD},
        n_images=8,
    )
    view = method.train_transform(32)
    cell, side = method.tile + 8, 3 * (method.tile + 8)
    puzzle = coordinate_puzzle(side)
    torch.manual_seed(1)
    for _ in range(5):
        shuffled, label, _ = view.shuffle(puzzle)
        grid = (
            unshuffle(shuffled, method.perms[label]) * torch.tensor(STD)[:, None, None]
            + torch.tensor(MEAN)[:, None, None]
        )
        for k in range(9):
            y, x = round(float(grid[k, 0, 0, 0]) * 255), round(float(grid[k, 1, 0, 0]) * 255)
            assert (y // cell, x // cell) == divmod(k, 3)
            assert torch.allclose(grid[k], puzzle[:, y : y + method.tile, x : x + method.tile], atol=1e-5)


def test_jigsaw_pp_replaces_up_to_two_tiles_with_tiles_of_another_image():
    method = JigsawPP(build_backbone("alexnet", 32), {"permutations": 30, **HEAD}, n_images=8)
    view = method.train_transform(32)
    torch.manual_seed(2)
    donors = torch.stack([view.shuffle(torch.rand(3, 57, 57))[2] for _ in range(100)])
    counts = (donors >= 0).sum(1)
    assert set(counts.tolist()) == {0, 1, 2}
    assert donors.max() <= 8 and donors.min() >= -1
    tiles_ = torch.randn(4, 9, 3, 16, 16)
    marks = torch.full((4, 9), -1)
    marks[0, 3], marks[2, 0], marks[2, 8] = 5, 1, 1
    swapped = swap_in_donors(tiles_, marks)
    assert torch.equal(swapped[0, 3], tiles_[3, 5])  # image 0 takes from image 3 (the one before it)
    assert torch.equal(swapped[2, 0], tiles_[1, 1]) and torch.equal(swapped[2, 8], tiles_[1, 1])
    keep = marks < 0
    assert torch.equal(swapped[keep], tiles_[keep])


def test_jigsaw_pp_tiles_are_normalised_per_tile_and_grey_about_70_percent_of_the_time():
    method = JigsawPP(build_backbone("alexnet", 32), {"permutations": 30, **HEAD}, n_images=8)
    view = method.train_transform(32)
    images = sample_images(40)
    torch.manual_seed(3)
    grey = 0
    for _repeat in range(3):
        for i in range(len(images)):
            shuffled, _, _ = view(images.image(i))
            assert torch.allclose(shuffled.mean(dim=(-2, -1)), torch.zeros(9, 3), atol=1e-4)
            grey += bool(torch.allclose(shuffled[:, 0], shuffled[:, 1], atol=1e-4))
    assert 0.55 <= grey / 120 <= 0.85


def test_jigsaw_pp_defaults_are_the_paper_setting():
    method = JigsawPP(build_backbone("alexnet", 32), HEAD, n_images=8)
    assert method.perms.shape == (701, 9)
    assert tiles.min_hamming(method.perms.numpy()) >= 3
    assert method.opts.replace == 2 and method.opts.grayscale == 0.7


def test_too_many_replaced_tiles_for_the_permutation_distance_is_a_recipe_error():
    data = {
        "name": "x",
        "data": {"train": {"path": str(SAMPLE / "train")}},
        "teacher": {"method": "jigsaw_pp", "options": {"replace": 3}},
    }
    with pytest.raises(RecipeError, match="teacher.options.replace 3 needs min_hamming above it"):
        recipe_from_dict(data)


@pytest.mark.parametrize("cls", [Jigsaw, JigsawPP])
def test_the_loss_falls_on_real_images(cls):
    torch.manual_seed(0)
    method = cls(build_backbone("alexnet", 32), {"permutations": 50, "min_hamming": 3, **HEAD}, n_images=8)
    losses = train_steps(method, fixed_batch(method, sample_images(4)), steps=4)
    assert losses[-1] < 0.8 * losses[0], losses
