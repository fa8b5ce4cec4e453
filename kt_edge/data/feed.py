"""Training batches read straight from a uint8 image array (the cache, or CIFAR pickles in memory).

DataLoader workers only copy rows and draw each image's augmentation parameters; pixels travel to
the device as uint8 (a quarter of float32's bytes) and ``BatchAugment`` makes the views there, a
whole batch per kernel. An image's key is (seed, epoch, index), the same as ``SeededViews`` uses.
"""

from __future__ import annotations

import numpy as np
import torch

from kt_edge.data.gpu_augment import BatchAugment
from kt_edge.errors import DataError


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch (the formula of ``SeededViews``)."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


def pixel_array(images, image_size: int) -> np.ndarray:
    """The dataset's uint8 [N, S, S, 3] array; batched augmentation needs images stored at the training size."""
    array = getattr(images, "array", None)
    if array is None or array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (image_size, image_size, 3):
        found = "no pixel array" if array is None else f"an array {array.dtype} {tuple(array.shape)}"
        raise DataError(f"{images.name}: batched augmentation needs images decoded at {image_size}px, found {found}; "
                        "set data.cache: true (or data.augment: per_sample)")
    return array


def resolve_augment(mode: str, images, image_size: int, device: torch.device, transform=None) -> str:
    """A recipe's ``data.augment`` as the path to take. ``auto`` is batched on CUDA when the pixels are in an
    array at the training size and the method's ``transform`` (when given) has a batched version."""
    if mode == "batched":
        pixel_array(images, image_size)
        if transform is not None:
            BatchAugment.from_transform(transform)
        return mode
    if mode == "auto":
        if device.type != "cuda":
            return "per_sample"
        try:
            pixel_array(images, image_size)
            if transform is not None:
                BatchAugment.from_transform(transform)
        except DataError:
            return "per_sample"
        return "batched"
    if mode != "per_sample":
        raise ValueError(f"data.augment must be auto, per_sample or batched, got {mode!r}")
    return mode


class ArrayBatches(torch.utils.data.Dataset):
    """A list of indices -> (uint8 images [B, S, S, 3], uniforms [B, views, draws], labels [B])."""

    def __init__(self, images, augment: BatchAugment, seed: int, image_size: int):
        pixel_array(images, image_size)
        self.images, self.augment, self.seed = images, augment, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, indices):
        index = np.asarray(indices, dtype=np.int64)
        order = np.argsort(index, kind="stable")  # ascending reads: sequential pages of the memory map
        array = self.images.array
        pixels = np.empty((len(index), *array.shape[1:]), dtype=np.uint8)
        pixels[order] = array[index[order]]
        uniforms = self.augment.draw([sample_key(self.seed, self.epoch, int(i)) for i in index])
        return torch.from_numpy(pixels), uniforms, torch.from_numpy(self.images.labels[index])
