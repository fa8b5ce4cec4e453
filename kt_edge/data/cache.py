"""A split decoded once into a uint8 array [N, S, S, 3] at the training resolution, read memory-mapped.

Decoding JPEGs is what starves a GPU, so the cache does it once (shorter side resized to S with
antialiasing, then the centre S x S crop) and training reads raw rows. A cache folder holds:

    images.npy   uint8 [N, S, S, 3], numpy format (memory-mapped when read)
    labels.npy   int64 [N] (-1 for unlabelled images)
    cache.json   n, size, source, labels file, classes, source fingerprint; written last

A build fills ``images.partial.npy`` and records the rows done in ``progress.json`` after each chunk
(under torchrun every rank decodes a share of the rows and keeps its own progress file), so an
interrupted build resumes where it stopped; a folder without ``cache.json`` is never taken as
complete. The folder's name derives from the recipe's source and the image size, so finding a
cache needs no scan of the images; the source fingerprint (names, sizes and mtimes of its files)
says whether the images on disk changed since. Training random-crops the cached centre crop, so
non-square images lose their borders outside it (CIFAR and other square sets lose nothing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.transforms import functional as TF

from kt_edge.atomic import atomic_path, write_json
from kt_edge.data.sources import Images, open_source
from kt_edge.data.workers import worker_options
from kt_edge.engine import distributed
from kt_edge.errors import DataError

CACHE_FORMAT = "kt-edge-image-cache"
CACHE_VERSION = 1
SIDECAR, IMAGES, LABELS = "cache.json", "images.npy", "labels.npy"
PARTIAL, PROGRESS = "images.partial.npy", "progress.json"

log = logging.getLogger(__name__)


class CachedImages(Images):
    """The cached array as a dataset; pickles without its pixels, so DataLoader workers reopen the map."""

    def __init__(self, root: Path, labels: np.ndarray, classes: list[str], name: str):
        super().__init__(labels, classes, name)
        self.root = Path(root)
        self._array = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.root / IMAGES, mmap_mode="r")
        return self._array

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(np.asarray(self.array[index]))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def source_fingerprint(path: Path | str) -> str:
    """Hash of every file's relative path, size and mtime under ``path``: cheap, and changes when the data does."""
    root = Path(path)
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            file = Path(folder) / name
            stat = file.stat()
            digest.update(f"{file.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def cache_folder(source, image_size: int, seed: int, root: Path | str) -> Path:
    """Where the cache of a recipe ``DataSource`` at ``image_size`` lives (a function of the recipe only)."""
    path = Path(source.path).expanduser().resolve()
    key = {
        "path": str(path),
        "format": source.format,
        "split": source.split,
        "subset": source.subset,
        "seed": seed if source.subset else None,
        "strict": source.strict,
        "size": image_size,
        "version": CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{path.parent.name}-{path.name}")
    return Path(root) / f"{slug}-{image_size}px-{digest}"


def open_cache(folder: Path | str) -> CachedImages:
    """A finished cache; refuses a partial or inconsistent one."""
    folder = Path(folder)
    card = read_card(folder)
    if card is None:
        raise DataError(f"{folder} is not a finished image cache (no {SIDECAR}); build it with `kt-edge data cache`")
    images = np.load(folder / card["images"], mmap_mode="r")
    labels = np.load(folder / card["labels"])
    size = card["size"]
    if images.shape != (card["n"], size, size, 3) or images.dtype != np.uint8 or labels.shape != (card["n"],):
        raise DataError(f"{folder}: {IMAGES} or {LABELS} does not match {SIDECAR}; delete the folder and rebuild")
    return CachedImages(folder, labels, card["classes"], name=f"{card['source']} (cached at {size}px)")


def read_card(folder: Path) -> dict | None:
    path = Path(folder) / SIDECAR
    if not path.is_file():
        return None
    card = json.loads(path.read_text())
    return card if card.get("format") == CACHE_FORMAT and card.get("version") == CACHE_VERSION else None


class _Decode:
    """PIL image -> uint8 [S, S, 3]: shorter side to S (antialiased), centre crop."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = TF.center_crop(TF.resize(image, self.size, antialias=True), self.size)
        return np.array(image, dtype=np.uint8)  # a writable copy: the DataLoader turns it into a tensor


def build_cache(
    images: Images,
    folder: Path | str,
    image_size: int,
    fingerprint: str,
    source: str = "",
    workers: int = 0,
    chunk: int = 1024,
    progress: bool = True,
) -> CachedImages:
    """Decode ``images`` into ``folder``, resuming a partial build made from the same source and size.

    Under torchrun every rank calls it and decodes its contiguous share of the rows into the one array, so
    the build takes 1 / world of the time and no rank waits long on another.
    """
    folder = Path(folder)
    rank, world = distributed.rank(), distributed.world_size()
    n, plan = len(images), {"n": len(images), "size": image_size, "fingerprint": fingerprint, "world": world}
    share = np.array_split(np.arange(n), world)[rank]  # this rank's rows
    lo, hi = (int(share[0]), int(share[-1]) + 1) if len(share) else (n, n)
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        fresh = not _resumable(folder, plan)
        if fresh:
            _clear(folder)
            np.lib.format.open_memmap(folder / PARTIAL, mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3))
    distributed.barrier()  # the array exists before any rank writes into it
    progress_file = folder / _progress_name(rank, world)
    done = lo + _rows_done(progress_file, plan)
    array = np.load(folder / PARTIAL, mmap_mode="r+")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(images.with_transform(_Decode(image_size)), range(done, hi)),
        batch_size=chunk,
        shuffle=False,
        **worker_options(workers),
    )
    bar = Progress(
        TextColumn("[bold]cache"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not (progress and distributed.is_main()),
    )
    with bar:
        task = bar.add_task("cache", total=hi - lo, completed=done - lo)
        for pixels, _ in loader:
            array[done : done + len(pixels)] = pixels.numpy()
            array.flush()
            done += len(pixels)
            write_json(progress_file, {**plan, "rows": done - lo})
            bar.update(task, completed=done - lo)
    del array
    distributed.barrier()  # every share is decoded
    if distributed.is_main():
        os.replace(folder / PARTIAL, folder / IMAGES)
        with atomic_path(folder / LABELS) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.asarray(images.labels, dtype=np.int64))
        write_json(
            folder / SIDECAR,
            {
                "format": CACHE_FORMAT,
                "version": CACHE_VERSION,
                "n": n,
                "size": image_size,
                "source": source or images.name,
                "images": IMAGES,
                "labels": LABELS,
                "classes": list(images.classes),
                "fingerprint": fingerprint,
            },
        )
        for stale in folder.glob("progress*.json"):
            stale.unlink()
    distributed.barrier()
    return open_cache(folder)


def _progress_name(rank: int, world: int) -> str:
    return PROGRESS if world == 1 else f"progress-{rank}-of-{world}.json"


def _rows_done(progress_file: Path, plan: dict) -> int:
    """Rows of this rank's share an interrupted build of the same plan decoded; 0 otherwise."""
    if not progress_file.is_file():
        return 0
    state = json.loads(progress_file.read_text())
    return int(state["rows"]) if {k: state.get(k) for k in plan} == plan else 0


def _resumable(folder: Path, plan: dict) -> bool:
    """A partial array is there and every progress file beside it belongs to this plan."""
    records = [json.loads(f.read_text()) for f in folder.glob("progress*.json")]
    return (folder / PARTIAL).is_file() and bool(records) and all({k: r.get(k) for k in plan} == plan for r in records)


def _clear(folder: Path) -> None:
    for name in (SIDECAR, IMAGES, LABELS, PARTIAL):
        (folder / name).unlink(missing_ok=True)
    for stale in folder.glob("progress*.json"):
        stale.unlink()


def cached_source(
    source, image_size: int, seed: int, root: Path | str, workers: int = 0, progress: bool = True
) -> CachedImages:
    """The cache of a recipe ``DataSource``, built (or resumed, or rebuilt when the images changed) if needed.

    Under torchrun every rank decodes its share of the images (``build_cache``).
    """
    folder = cache_folder(source, image_size, seed, root)
    path = Path(source.path)
    if not path.is_dir():
        raise DataError(f"data folder not found: {path}")
    fingerprint = source_fingerprint(path)
    card = read_card(folder)
    if card is None or card["fingerprint"] != fingerprint:
        if card is not None and distributed.is_main():
            log.warning("%s changed since %s was built: rebuilding it", path, folder)
        distributed.barrier()  # every rank has read the card before the build may delete it
        build_cache(
            open_source(source, seed),
            folder,
            image_size,
            fingerprint,
            source=str(path),
            workers=workers,
            progress=progress,
        )
    return open_cache(folder)
