"""Image transforms: the deterministic eval view, and the MoCo v2 augmentation used for training.

Randomness comes from torch's global generator only, so the training feed (``kt_edge.data.feed``) can
make every sample's augmentation a pure function of (seed, epoch, index): resume and worker count
change nothing.
"""

from __future__ import annotations

from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics: imported teachers expect them
STD = (0.229, 0.224, 0.225)


def resize_for(image_size: int) -> int:
    """Shorter side before the centre crop: the usual 0.875 crop ratio, none for tiny images."""
    return image_size if image_size <= 64 else round(image_size / 0.875)


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize(resize_for(image_size), antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


def moco_v2(image_size: int) -> T.Compose:
    """MoCo v2 augmentation (Chen et al. 2020); blur is dropped for tiny images, as CIFAR recipes do."""
    steps = [
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if image_size > 64:
        kernel = 2 * (image_size // 20) + 1
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(steps)


def crop_flip(image_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """Random resized crop and horizontal flip only: the official CompRess views, and DeepCluster's."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=scale, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


class TwoViews:
    """Two augmentations of one image, for the joint-embedding teachers: ``first`` twice (MoCo, SimCLR), or
    ``first`` and ``second`` (BYOL's and Barlow Twins' asymmetric pair)."""

    def __init__(self, first, second=None):
        self.first = first
        self.second = first if second is None else second

    def __call__(self, image):
        return self.first(image), self.second(image)
