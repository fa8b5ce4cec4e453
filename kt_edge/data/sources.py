"""Datasets from disk: ImageFolder trees (labelled), flat folders (unlabelled), CIFAR-10 pickles.

Corrupt or non-image files are found when the source is opened, skipped and counted in one
warning (or refused in strict mode), so an epoch never dies on a bad file.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from kt_edge_runtime.preprocess import load_rgb  # the device's decoding: host and device see the same pixels
from PIL import Image

from kt_edge.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNLABELLED = -1


class Images(torch.utils.data.Dataset):
    """A list of images with optional labels; ``transform`` turns a PIL RGB image into model input."""

    def __init__(self, labels: np.ndarray, classes: list[str], name: str):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = classes
        self.name = name
        self.transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labelled(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int):
        image = self.image(index)
        return (self.transform(image) if self.transform else image), int(self.labels[index])

    def with_transform(self, transform: Callable) -> "Images":
        """A shallow copy with another transform (the underlying files are shared)."""
        return self._copy(transform=transform)

    def with_labels(self, labels: np.ndarray) -> "Images":
        """A shallow copy whose targets are ``labels``: training is label-free, so methods use this slot
        for what they need per image (pseudo-labels, or the image index to look up cached features)."""
        if len(labels) != len(self):
            raise ValueError(f"{len(labels)} labels for {len(self)} images")
        return self._copy(labels=np.asarray(labels, dtype=np.int64))

    def _copy(self, **changes) -> "Images":
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.__dict__.update(changes)
        return clone


class FileImages(Images):
    def __init__(self, paths: list[Path], labels, classes, name):
        super().__init__(labels, classes, name)
        self.paths = paths

    def image(self, index: int) -> Image.Image:
        return load_rgb(self.paths[index])


class ArrayImages(Images):
    """Images already decoded into a uint8 array [N, H, W, 3] (CIFAR pickles)."""

    def __init__(self, array: np.ndarray, labels, classes, name):
        super().__init__(labels, classes, name)
        self.array = array

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.array[index])


@dataclass
class Scan:
    paths: list[Path]
    labels: list[int]
    bad: list[tuple[Path, str]]


def _check(path: Path) -> str | None:
    """Why the file is not a usable image, or None. Decodes fully: truncation only shows there."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        load_rgb(path)
    except Image.DecompressionBombError as exc:
        return f"too large ({exc} Raise PIL.Image.MAX_IMAGE_PIXELS to accept it.)"
    except Exception as exc:  # PIL's decoders raise many types on malformed files (struct.error, IndexError, ...)
        return f"not a readable image ({exc.__class__.__name__})"
    return None


def _scan(files: list[tuple[Path, int]], strict: bool) -> Scan:
    scan = Scan([], [], [])
    for path, label in files:
        problem = _check(path)
        if problem is None:
            scan.paths.append(path)
            scan.labels.append(label)
            continue
        if strict:
            raise DataError(f"{path}: {problem} (strict mode; drop `strict` to skip bad files)")
        scan.bad.append((path, problem))
    return scan


@dataclass
class Listing:
    """What scanning a tree found besides its images: entries that cannot be used, with the reason."""

    files: list[tuple[Path, str]]  # dangling symlinks, symlink loops, entries that cannot be looked at
    folders: list[tuple[Path, str]]  # folders that cannot be read


def _entries(folder: Path, listing: Listing) -> tuple[list[Path], list[Path]]:
    """A folder's visible files and sub-folders, sorted; what cannot be used goes into ``listing``."""
    try:
        paths = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        listing.folders.append((folder, f"folder not readable: {exc.strerror}"))
        return [], []
    files, folders = [], []
    for path in paths:
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            why = (
                "symlink loop"
                if exc.errno == errno.ELOOP
                else "dangling symlink"
                if path.is_symlink()
                else f"not readable: {exc.strerror}"
            )
            listing.files.append((path, why))
            continue
        if stat.S_ISREG(mode):
            files.append(path)
        elif stat.S_ISDIR(mode):
            folders.append(path)
    return files, folders


def detect_format(path: Path) -> str:
    if (path / "data_batch_1").exists() or (path / "cifar-10-batches-py").exists():
        return "cifar10"
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        return "imagefolder"
    return "folder"


def open_images(
    path: Path | str,
    format: str = "auto",
    split: str = "train",
    subset: int | None = None,
    seed: int = 0,
    strict: bool = False,
) -> Images:
    """Open one split. ``subset`` keeps a seeded random sample of that many images."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"data folder not found: {path}")
    try:
        os.scandir(path).close()
    except OSError as exc:
        raise DataError(f"{path}: the data folder cannot be read ({exc.strerror})") from None
    format = detect_format(path) if format == "auto" else format
    if format == "cifar10":
        dataset = _open_cifar10(path, split)
    else:
        listing = Listing([], [])
        top_files, top_folders = _entries(path, listing)
        if format == "imagefolder":
            classes = [folder.name for folder in top_folders]
            if not classes:
                raise DataError(f"{path}: no class folders (expected <class>/<image> for an ImageFolder tree)")
            files = [(f, label) for label, folder in enumerate(top_folders) for f in _entries(folder, listing)[0]]
        else:
            classes = []
            files = [(f, UNLABELLED) for f in top_files]
        if strict and (listing.folders or listing.files):
            where, why = (listing.folders or listing.files)[0]
            raise DataError(f"{where}: {why} (strict mode; drop `strict` to skip bad files)")
        if subset is not None and subset < len(files):
            # Subset before the scan so opening a big folder for a small run stays fast.
            keep = np.sort(np.random.default_rng(seed).choice(len(files), subset, replace=False))
            files = [files[i] for i in keep]
            subset = None
        scan = _scan(files, strict)
        bad_files = listing.files + scan.bad
        if bad_files or listing.folders:
            counts = []
            if bad_files:
                counts.append(f"{len(bad_files)} unreadable file(s) of {len(files) + len(listing.files)}")
            if listing.folders:
                counts.append(f"{len(listing.folders)} unreadable folder(s)")
            examples = ", ".join(f"{p.name} ({why})" for p, why in (listing.folders + bad_files)[:3])
            warnings.warn(f"{path}: skipped {' and '.join(counts)}: {examples}", stacklevel=2)
        dataset = FileImages(scan.paths, scan.labels, classes, name=str(path))
        if files and not scan.paths:
            raise DataError(f"{path}: none of its {len(files)} file(s) is a readable image")
    if len(dataset) == 0:
        raise DataError(f"{path}: no images found")
    if subset is not None and subset < len(dataset):
        keep = np.sort(np.random.default_rng(seed).choice(len(dataset), subset, replace=False))
        dataset = _take(dataset, keep)
    return dataset


def _take(dataset: ArrayImages, keep: np.ndarray) -> ArrayImages:
    return ArrayImages(dataset.array[keep], dataset.labels[keep], dataset.classes, dataset.name)


def _open_cifar10(path: Path, split: str) -> ArrayImages:
    from torchvision.datasets import CIFAR10

    root = path.parent if (path / "data_batch_1").exists() else path
    try:
        cifar = CIFAR10(str(root), train=split == "train", download=False)
    except RuntimeError as exc:
        raise DataError(f"{path}: not a CIFAR-10 python folder ({exc})") from None
    return ArrayImages(cifar.data, np.asarray(cifar.targets), list(cifar.classes), name=f"{path}:{split}")


def open_source(source, seed: int = 0) -> Images:
    """Open a recipe ``DataSource``."""
    return open_images(source.path, source.format, source.split, source.subset, seed, source.strict)
