"""Augmentations of the joint-embedding teachers: SimCLR's, and BYOL's asymmetric pair (also Barlow Twins').

Gaussian blur is left out for images of 64 px and below, as the papers' CIFAR recipes do.
"""

from __future__ import annotations

from torchvision import transforms as T

from kt_edge.data.augment import MEAN, STD, TwoViews

SMALL_IMAGE = 64


def simclr_view(image_size: int) -> T.Compose:
    """SimCLR (Chen et al. 2020): colour strength 1.0, or 0.5 for small images (the paper's CIFAR-10 setting)."""
    s = 1.0 if image_size > SMALL_IMAGE else 0.5
    steps = [
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if image_size > SMALL_IMAGE:
        steps.append(T.RandomApply([_blur(image_size)], p=0.5))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


def byol_view(image_size: int, blur: float, solarize: float) -> T.Compose:
    """One of BYOL's two views (Grill et al. 2020, table 6): blur 1.0 / 0.1 and solarisation 0.0 / 0.2."""
    steps = [
        T.RandomResizedCrop(image_size, scale=(0.08, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if image_size > SMALL_IMAGE and blur > 0:
        steps.append(T.RandomApply([_blur(image_size)], p=blur))
    if solarize > 0:
        steps.append(T.RandomSolarize(threshold=128, p=solarize))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


def _blur(image_size: int) -> T.GaussianBlur:
    return T.GaussianBlur(2 * (image_size // 20) + 1, sigma=(0.1, 2.0))  # kernel about 10% of the image


def byol_pair(image_size: int) -> TwoViews:
    return TwoViews(byol_view(image_size, blur=1.0, solarize=0.0), byol_view(image_size, blur=0.1, solarize=0.2))
