"""Relative patch location and rotation: the labels say what was done to the image; the loss falls."""

import torch
from sample_kit import fixed_batch, sample_images, train_steps
from teacher_kit import coordinate_puzzle

from kt_edge.data.augment import MEAN, STD
from kt_edge.models.backbones import build_backbone
from kt_edge.teachers.relative_patch import NEIGHBOURS, RelativePatch, drop_colours
from kt_edge.teachers.rotation import Rotation, rotate_batch

HEAD = {"tile_dim": 32, "hidden": 64}


def corner(patch: torch.Tensor) -> tuple[int, int]:
    """Where a patch of a coordinate puzzle was cut, read back from its top-left pixel."""
    pixel = patch[:, 0, 0] * torch.tensor(STD) + torch.tensor(MEAN)
    return round(float(pixel[0]) * 255), round(float(pixel[1]) * 255)


def test_the_rpl_label_matches_the_patch_offset():
    method = RelativePatch(build_backbone("alexnet", 32), {"color_drop": False, **HEAD}, n_images=8)
    view = method.train_transform(32)
    tile = method.tile
    cell = tile + tile // 2
    jitter = round(0.075 * tile)
    puzzle = coordinate_puzzle(3 * cell)
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        patches, label = view.pair(puzzle)
        (yc, xc), (yn, xn) = corner(patches[0]), corner(patches[1])
        assert (yc // cell, xc // cell) == (1, 1)  # the first patch is the central one
        dy, dx = yn - yc, xn - xc
        step = NEIGHBOURS[label]
        for delta, direction in ((dy, step[0]), (dx, step[1])):
            assert abs(delta - direction * cell) <= 2 * jitter  # one cell away in the labelled direction
        seen.add(label)
    assert seen == set(range(8))


def test_colour_dropping_keeps_one_channel_and_leaves_faint_noise_in_the_others():
    patches = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    dropped = drop_colours(patches)
    for before, after in zip(patches, dropped):
        kept = [c for c in range(3) if torch.equal(after[c], before[c])]
        assert len(kept) == 1
        for c in set(range(3)) - set(kept):
            assert 0 < after[c].std() < before[kept[0]].std() / 20


def test_the_labelled_rotation_undone_gives_the_original():
    images = torch.randn(5, 3, 32, 32)
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (20, 3, 32, 32)
    assert sorted(labels.tolist()) == sorted([0, 1, 2, 3] * 5)
    for i in range(20):
        restored = torch.rot90(rotated[i], -int(labels[i]), dims=(1, 2))
        assert torch.equal(restored, images[i % 5])
        if labels[i]:
            assert not torch.equal(rotated[i], images[i % 5])


def test_the_rpl_loss_falls_on_real_images():
    torch.manual_seed(0)
    method = RelativePatch(build_backbone("alexnet", 32), HEAD, n_images=8)
    losses = train_steps(method, fixed_batch(method, sample_images(4)), steps=4)
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_rotation_loss_falls_on_real_images():
    torch.manual_seed(0)
    method = Rotation(build_backbone("alexnet", 32), {}, n_images=8)
    losses = train_steps(method, fixed_batch(method, sample_images(2)), steps=4)
    assert losses[-1] < 0.8 * losses[0], losses
