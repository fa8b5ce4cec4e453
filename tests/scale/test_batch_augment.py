"""Batched MoCo v2 augmentation: per-image parameters, each op equal to torchvision's, keyed determinism."""

import math

import numpy as np
import pytest
import torch
from sample_kit import SAMPLE
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from kt_edge.data.augment import MEAN, STD, TwoViews, moco_v2
from kt_edge.data.gpu_augment import (
    CROP_ATTEMPTS,
    BatchAugment,
    Blur,
    Flip,
    Grayscale,
    Jitter,
    Normalize,
    ResizedCrop,
    Solarize,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    crop_resize,
    gaussian_blur,
)
from kt_edge.data.sources import open_images
from kt_edge.errors import DataError


def _images(n=8, size=32, seed=0):
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_built_from_the_cpu_transform_with_its_parameters():
    small = BatchAugment.from_transform(moco_v2(32))
    assert [type(op) for op in small.view_ops[0]] == [ResizedCrop, Jitter, Grayscale, Flip, Normalize]
    crop, jitter, gray, flip, norm = small.view_ops[0]
    assert crop.size == (32, 32) and crop.scale == (0.2, 1.0) and crop.mode == "bilinear"
    assert jitter.p == 0.8 and tuple(jitter.ranges[0]) == (0.6, 1.4) and tuple(jitter.ranges[3]) == (-0.1, 0.1)
    assert gray.p == 0.2 and flip.p == 0.5 and norm.mean == MEAN and small.views == 1
    big = BatchAugment.from_transform(TwoViews(moco_v2(224)))
    blur = next(op for op in big.view_ops[1] if isinstance(op, Blur))
    assert big.views == 2 and blur.p == 0.5 and blur.kernel == (23, 23) and blur.sigma == (0.1, 2.0)
    assert big.draws == 2 * (2 * CROP_ATTEMPTS + 2 + 9 + 1 + 2 + 1)


@pytest.mark.parametrize("image_size", [32, 224])
@pytest.mark.parametrize("method", ["moco", "simclr", "byol", "barlow"])
def test_every_joint_embedding_teacher_has_a_batched_pair_with_its_own_views(method, image_size):
    """SimCLR's, BYOL's and Barlow's pairs are batched too (BYOL's two views differ: blur and solarisation)."""
    from kt_edge.teachers import TEACHERS

    pair = TEACHERS[method].train_transform(image_size)
    aug = BatchAugment.from_transform(pair)
    assert aug.views == 2
    if method in ("byol", "barlow"):
        solarize = [[op for op in ops if isinstance(op, Solarize)] for ops in aug.view_ops]
        assert solarize[0] == [] and [op.p for op in solarize[1]] == [0.2]
        if image_size > 64:
            blurs = [[op.p for op in ops if isinstance(op, Blur)] for ops in aug.view_ops]
            assert blurs == [[1.0], [0.1]]
    first, second = aug(_images(4, image_size), aug.draw(range(4)))
    assert first.shape == second.shape == (4, 3, image_size, image_size)


def test_solarize_inverts_bright_pixels_of_the_chosen_images_as_torchvision():
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = Solarize(0.5, 128)(x.float() / 255, torch.tensor([[0.1], [0.9], [0.4]]))
    for i, chosen in enumerate((True, False, True)):
        expected = TF.solarize(x[i], 128) if chosen else x[i]
        torch.testing.assert_close(out[i], expected.float() / 255, atol=1e-6, rtol=0)


def test_a_step_without_batched_version_is_refused_by_name():
    with pytest.raises(DataError, match="RandomRotation.*data.augment: per_sample"):
        BatchAugment.from_transform(T.Compose([T.RandomRotation(10), T.ToTensor()]))


def test_parameters_and_views_depend_on_the_key_only():
    aug = BatchAugment.from_transform(TwoViews(moco_v2(32)))
    draws = aug.draw([11, 22, 33])
    assert draws.shape == (3, aug.draws) and 0 <= draws.min() and draws.max() < 1
    torch.testing.assert_close(draws[1], aug.draw([22])[0], rtol=0, atol=0)
    images = _images(3)
    q, k = aug(images, draws)
    assert not torch.equal(q, k)  # the two views of an image differ
    q1, k1 = aug(images[1:2], aug.draw([22]))  # alone in its batch: the same views
    torch.testing.assert_close(q[1:2], q1, atol=1e-5, rtol=0)
    torch.testing.assert_close(k[1:2], k1, atol=1e-5, rtol=0)
    assert q.shape == (3, 3, 32, 32) and q.dtype == torch.float32


def test_every_image_of_a_batch_gets_its_own_crop_and_jitter():
    aug = BatchAugment.from_transform(moco_v2(32))
    same = _images(1).expand(32, -1, -1, -1).contiguous()
    out = aug(same, aug.draw(range(32))).flatten(1)
    distinct = {tuple(row[:64].round(decimals=4).tolist()) for row in out}
    assert len(distinct) == 32


def test_crop_boxes_follow_torchvision_random_resized_crop():
    crop = BatchAugment.from_transform(moco_v2(32)).view_ops[0][0]
    n = 5000
    u = torch.rand(n, crop.draws, generator=torch.Generator().manual_seed(0))
    top, left, h, w = crop.boxes(u, 48, 64)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 48).all() and (left + w <= 64).all()
    assert (h >= 1).all() and (w >= 1).all() and torch.equal(h, h.round()) and torch.equal(top, top.round())
    torch.manual_seed(0)
    ref = torch.tensor(
        [T.RandomResizedCrop.get_params(torch.empty(3, 48, 64), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)],
        dtype=torch.float32,
    )  # rows (top, left, h, w)
    for ours, theirs, tol in (
        ((h * w / (48 * 64)), ref[:, 2] * ref[:, 3] / (48 * 64), 0.02),  # area fraction
        ((w / h).log(), (ref[:, 3] / ref[:, 2]).log(), 0.015),  # log aspect ratio
        ((left + w / 2) / 64, (ref[:, 1] + ref[:, 3] / 2) / 64, 0.01),
    ):  # horizontal centre
        assert abs(ours.mean() - theirs.mean()) < tol and abs(ours.median() - theirs.median()) < 2 * tol


def test_crop_resize_matches_torchvision_resized_crop_inside_the_box():
    x = torch.rand(2, 3, 40, 48)
    boxes = [(5, 7, 20, 24), (0, 0, 40, 48)]
    top, left, h, w = (torch.tensor([b[i] for b in boxes], dtype=torch.float32) for i in range(4))
    out = crop_resize(x, top, left, h, w, (32, 32))
    for i, (t, le, hh, ww) in enumerate(boxes):
        ref = TF.resized_crop(x[i], t, le, hh, ww, [32, 32], antialias=False)
        torch.testing.assert_close(out[i, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-5, rtol=0)
    whole = crop_resize(x, torch.zeros(2), torch.zeros(2), torch.full((2,), 40.0), torch.full((2,), 48.0), (40, 48))
    torch.testing.assert_close(whole, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "ours,theirs,low,high",
    [
        (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_each_colour_op_equals_torchvision_with_a_factor_per_image(ours, theirs, low, high):
    x = torch.rand(6, 3, 12, 12)
    x[0] = 0.5  # a flat grey image: no hue, no saturation
    factors = torch.linspace(low, high, 6)
    out = ours(x.clone(), factors)
    for i in range(6):
        torch.testing.assert_close(out[i], theirs(x[i], factors[i].item()), atol=2e-5, rtol=0)


def test_jitter_applies_the_four_ops_in_each_images_own_order():
    jitter = Jitter(1.0, [(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)])
    x = torch.rand(5, 3, 10, 10)
    u = torch.rand(5, jitter.draws, generator=torch.Generator().manual_seed(3))
    out = jitter(x, u)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(5):
        y = x[i]
        for op in u[i, 5:9].argsort().tolist():
            low, high = jitter.ranges[op]
            y = ops[op](y, low + (high - low) * u[i, 1 + op].item())
        torch.testing.assert_close(out[i], y, atol=3e-5, rtol=0)
    skipped = Jitter(0.5, jitter.ranges)(x, torch.cat([torch.full((5, 1), 0.9), u[:, 1:]], 1))
    assert torch.equal(skipped, x)


def test_blur_equals_torchvision_gaussian_blur_per_image():
    x = torch.rand(3, 3, 30, 30)
    sigma = torch.tensor([0.1, 0.8, 2.0])
    out = gaussian_blur(x, (9, 9), sigma)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.gaussian_blur(x[i], [9, 9], [sigma[i].item()] * 2), atol=1e-5, rtol=0)


def test_grayscale_and_flip_pick_their_images_by_probability():
    x = torch.rand(4, 3, 8, 8)
    u = torch.tensor([[0.1], [0.9], [0.19], [0.21]])
    gray = Grayscale(0.2)(x, u)
    assert torch.equal(gray[1], x[1]) and torch.equal(gray[3], x[3])
    for i in (0, 2):
        torch.testing.assert_close(gray[i], TF.rgb_to_grayscale(x[i], num_output_channels=3), atol=1e-6, rtol=0)
    flip = Flip(0.5)(x, torch.tensor([[0.2], [0.7], [0.49], [0.51]]))
    assert torch.equal(flip[0], x[0].flip(-1)) and torch.equal(flip[1], x[1]) and torch.equal(flip[2], x[2].flip(-1))
    rate = (torch.rand(20000, generator=torch.Generator().manual_seed(1)) < 0.2).float().mean()
    assert math.isclose(rate, 0.2, abs_tol=0.01)


def test_same_recipe_as_the_cpu_pipeline_in_distribution():
    """Channel statistics of 256 views of 64 real images: batched on tensors vs torchvision per image on PIL."""
    data = open_images(SAMPLE / "train", subset=64, seed=0)
    pixels = torch.from_numpy(np.stack([np.asarray(data.image(i)) for i in range(64)])).repeat(4, 1, 1, 1)
    aug = BatchAugment.from_transform(moco_v2(32))
    batched = aug(pixels, aug.draw(range(256)))
    cpu = moco_v2(32)
    torch.manual_seed(0)
    reference = torch.stack([cpu(data.image(i % 64)) for i in range(256)])
    for stat in (lambda v: v.mean(dim=(0, 2, 3)), lambda v: v.std(dim=(0, 2, 3))):
        torch.testing.assert_close(stat(batched), stat(reference), atol=0.12, rtol=0)

    def equal_channels(v):
        return (v[:, 0] * STD[0] + MEAN[0] - v[:, 2] * STD[2] - MEAN[2]).abs().amax((1, 2)) < 0.02

    assert 0.1 < equal_channels(batched).float().mean() < 0.3  # grayscale about 20% of the time
    assert 0.1 < equal_channels(reference).float().mean() < 0.3


def test_wrong_input_is_refused():
    aug = BatchAugment([[Normalize(MEAN, STD)]])
    with pytest.raises(ValueError, match="uint8 images"):
        aug(torch.rand(2, 3, 8, 8), torch.rand(2, 0))


@pytest.mark.parametrize("method, image_size", [("moco", 224), ("byol", 224), ("simclr", 32)])
def test_a_batch_is_augmented_without_reading_a_value_back_to_the_host(method, image_size):
    """On the meta device (a stand-in for CUDA) any data-dependent shape (nonzero), host read (.item()) or
    tensor made on the CPU fails: the batched path must need none of them, or it would stall the GPU's queue."""
    from kt_edge.teachers import TEACHERS

    aug = BatchAugment.from_transform(TEACHERS[method].train_transform(image_size))
    meta = torch.device("meta")
    views = aug(
        torch.empty(8, image_size, image_size, 3, dtype=torch.uint8, device=meta),
        torch.empty(8, aug.draws, device=meta),
    )
    assert all(v.device == meta and v.shape == (8, 3, image_size, image_size) for v in views)
