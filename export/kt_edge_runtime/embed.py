"""Embed image files with a bundle: collect, preprocess as the manifest says, run in batches."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_open, write_bytes
from .backends import Backend, run_batched
from .bundle import InputSpec
from .preprocess import preprocess_batch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def collect_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted); order is kept."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return found


def embed_files(
    backend: Backend,
    spec: InputSpec,
    files: Sequence[Path],
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """float32 [len(files), D] embeddings, batch by batch so memory stays flat."""
    if not files:
        raise ValueError("no images to embed")
    chunks = []
    for start in range(0, len(files), batch_size):
        batch = preprocess_batch(files[start : start + batch_size], spec)
        chunks.append(run_batched(backend, batch, batch_size))
        if progress is not None:
            progress(min(start + batch_size, len(files)), len(files))
    return np.concatenate(chunks)


def text_progress(done: int, total: int) -> None:
    """A one-line progress bar on stderr, redrawn in place."""
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def save_embeddings(out: str | os.PathLike, embeddings: np.ndarray, files: Sequence[Path]) -> Path:
    """Write out.npy and, next to it, out.txt listing the image of each row; both atomically."""
    out = Path(out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    with atomic_open(out) as fh:
        np.save(fh, embeddings, allow_pickle=False)
    write_bytes(out.with_suffix(".txt"), "".join(f"{f}\n" for f in files).encode())
    return out
