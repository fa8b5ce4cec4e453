"""The training feed: which images, in which order, augmented how, and on the device, epoch after epoch.

An image's augmentation is a pure function of (seed, epoch, index), whatever the worker, the rank or
the resume point: the sampler yields (epoch, index) pairs, and the dataset seeds torch's generator
(per-sample path) or the image's uniforms (batched path) from them. So the DataLoader's workers can
live across epochs (``persistent_workers``) and still augment each epoch differently.

Two paths: ``per_sample`` (DataLoader workers decode and augment each image with the method's
``train_transform``) and ``batched`` (workers only copy uint8 rows of a cached array and draw each
image's parameters; pixels travel to the device as uint8, a quarter of float32's bytes, and
``BatchAugment`` makes the views there, a whole batch per kernel).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import numpy as np
import torch

from kt_edge.data.gpu_augment import BatchAugment
from kt_edge.data.workers import worker_options
from kt_edge.engine import distributed
from kt_edge.errors import DataError

log = logging.getLogger(__name__)


def sample_key(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) pairs: a seeded permutation per epoch, from sample ``start`` on when resuming.

    ``epoch`` and ``start`` are set before each pass. With ``world`` ranks, rank r takes the r-th contiguous
    slice of every global batch of ``batch_size``, so the ranks together see exactly the batches one process
    would.
    """

    def __init__(
        self, n: int, seed: int, epoch: int = 0, start: int = 0, *, rank: int = 0, world: int = 1, batch_size: int = 1
    ):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world, self.batch_size = rank, world, batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=generator)[self.start :]
        if self.world > 1:
            order = order[: len(order) // self.batch_size * self.batch_size]
            order = order.view(-1, self.world, self.batch_size // self.world)[:, self.rank].reshape(-1)
        return ((self.epoch, index) for index in order.tolist())

    def __len__(self) -> int:
        if self.world > 1:
            return (self.n - self.start) // self.batch_size * (self.batch_size // self.world)
        return self.n - self.start


class SeededViews(torch.utils.data.Dataset):
    """(epoch, index) -> the image's training views, torch's generator seeded from (seed, epoch, index) around
    the transform and left as it was. The generator is the process's: a lock keeps threads (ranks emulated
    as threads, say) from drawing from it between the seeding and the transform."""

    _generator_lock = threading.Lock()

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        with self._generator_lock:
            state = torch.get_rng_state()
            torch.manual_seed(sample_key(self.seed, epoch, index))
            try:
                return self.dataset[index]
            finally:
                torch.set_rng_state(state)


def pixel_array(images, image_size: int) -> np.ndarray:
    """The dataset's uint8 [N, S, S, 3] array; batched augmentation needs images stored at the training size."""
    array = getattr(images, "array", None)
    if array is None or array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (image_size, image_size, 3):
        found = "no pixel array" if array is None else f"an array {array.dtype} {tuple(array.shape)}"
        raise DataError(
            f"{images.name}: batched augmentation needs images decoded at {image_size}px, found {found}; "
            "set data.cache: true (or data.augment: per_sample)"
        )
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
        except DataError as exc:
            log.info("data.augment auto: augmenting per sample in DataLoader workers (%s)", exc)
            return "per_sample"
        return "batched"
    if mode != "per_sample":
        raise ValueError(f"data.augment must be auto, per_sample or batched, got {mode!r}")
    return mode


class ArrayBatches(torch.utils.data.Dataset):
    """A list of (epoch, index) -> (uint8 images [B, S, S, 3], uniforms [B, draws], labels [B])."""

    def __init__(self, images, augment: BatchAugment, seed: int, image_size: int):
        pixel_array(images, image_size)
        self.images, self.augment, self.seed = images, augment, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, items: list[tuple[int, int]]):
        index = np.asarray([i for _, i in items], dtype=np.int64)
        order = np.argsort(index, kind="stable")  # ascending reads: sequential pages of the memory map
        array = self.images.array
        pixels = np.empty((len(index), *array.shape[1:]), dtype=np.uint8)
        pixels[order] = array[index[order]]
        uniforms = self.augment.draw([sample_key(self.seed, epoch, i) for epoch, i in items])
        return torch.from_numpy(pixels), uniforms, torch.from_numpy(self.images.labels[index])


class TrainingFeed:
    """This rank's share of each global batch, augmented and on the device; one DataLoader for the whole run,
    its workers kept between epochs."""

    def __init__(
        self,
        dataset,
        transform,
        augment: str,
        *,
        seed: int,
        batch_size: int,
        image_size: int,
        device: torch.device,
        workers: int,
        memory_format=torch.contiguous_format,
    ):
        local = distributed.local_batch_size(batch_size, "train.batch_size")
        self.device, self.memory_format = device, memory_format
        self.sampler = EpochSampler(
            len(dataset), seed, rank=distributed.rank(), world=distributed.world_size(), batch_size=batch_size
        )
        common = dict(
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            **worker_options(workers),  # the main process handles a stop
            generator=torch.Generator().manual_seed(seed),
        )  # keeps the global RNG untouched
        if augment == "batched":
            self.augment = BatchAugment.from_transform(transform)
            self.loader = torch.utils.data.DataLoader(
                ArrayBatches(dataset, self.augment, seed, image_size),
                batch_size=None,
                sampler=torch.utils.data.BatchSampler(self.sampler, local, drop_last=True),
                **common,
            )
        elif augment == "per_sample":
            self.augment = None
            self.loader = torch.utils.data.DataLoader(
                SeededViews(dataset.with_transform(transform), seed),
                batch_size=local,
                drop_last=True,
                sampler=self.sampler,
                **common,
            )
        else:
            raise ValueError(f"augment must be 'per_sample' or 'batched', got {augment!r}")

    def epoch(self, epoch: int, start: int) -> Iterator:
        """The batches of ``epoch`` from sample ``start`` on: (views, labels) on the device."""
        self.sampler.epoch, self.sampler.start = epoch, start
        for batch in self.loader:
            if self.augment is None:
                yield self._to(batch)
                continue
            pixels, uniforms, labels = batch
            views = self.augment(pixels.to(self.device, non_blocking=True), uniforms.to(self.device, non_blocking=True))
            yield self._to(views), labels.to(self.device, non_blocking=True)

    def _to(self, batch):
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device, non_blocking=True)
            return batch.contiguous(memory_format=self.memory_format) if batch.ndim == 4 else batch
        if isinstance(batch, (list, tuple)):
            return type(batch)(self._to(item) for item in batch)
        return batch
