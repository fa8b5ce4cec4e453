"""Embed a dataset with any model, in RAM or streamed to fp16 shards on disk.

Clustering, distillation and evaluation all consume teacher features; this
module is the single place that produces them. `embed` returns arrays for sets
that fit in memory; `extract` streams to a sharded `FeatureStore` so that a
1.28M x 2048 ImageNet embedding never has to sit in RAM at once, can resume
after an interruption shard by shard, and can be split across DDP ranks.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset, Subset

from kt_edge.atomic import atomic_path, write_json
from kt_edge.data.workers import worker_options
from kt_edge.engine.device import resolve_device
from kt_edge.errors import DataError

INDEX_NAME = "index.json"
PLAN_NAME = "plan.json"
STORE_FORMAT = "kt-edge-features"
STORE_VERSION = 1
STORE_DTYPE = np.float16


def _autocast(device: torch.device):
    """bf16 autocast on CUDA only; CPU embeds stay fp32 so results are exact and reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@contextmanager
def _eval_mode(model: torch.nn.Module, device: torch.device):
    """Move the model (outside inference mode, so it stays trainable) and put it in eval; restore train mode after."""
    was_training = model.training
    model.to(device).eval()
    try:
        yield
    finally:
        model.train(was_training)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def _loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        pin_memory=pin_memory,
        persistent_workers=False,
        **worker_options(workers),
    )


def _forward(model: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One batch of embeddings as float32 [B, D] on the CPU."""
    images = images.to(device, non_blocking=True)
    with _autocast(device):
        out = model(images)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model returned {type(out).__name__}, expected a tensor of embeddings")
    return out.flatten(1).float().cpu()


Runner = Callable[[torch.Tensor], np.ndarray]  # a batch of images -> its embeddings, float32 [B, D]


def _runner(model: torch.nn.Module, device: torch.device) -> Runner:
    return lambda images: _forward(model, images, device).numpy()


def _batches(runners: dict[str, Runner], loader) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Yield ({runner: features float32 [B, D]}, labels int64 [B]) for each batch of a loader: every runner
    sees the batch the loader decoded once."""
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TypeError("dataset items must be (image_tensor, label) pairs; use label -1 when unlabelled")
        images, labels = batch
        yield {name: run(images) for name, run in runners.items()}, torch.as_tensor(labels).to(torch.int64).numpy()


def embed_with(
    runners: dict[str, Runner],
    dataset: Dataset,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = True,
    description: str = "embed",
    pin_memory: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Embed a dataset that fits in RAM with every runner side by side (a model, and each export of it):
    {runner: float32 features [N, D]} and int64 labels [N]."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot embed an empty dataset")
    feats: dict[str, np.ndarray] = {}
    labels = np.empty(n, dtype=np.int64)
    start = 0
    with _progress(progress) as bar:
        task = bar.add_task(description, total=n)
        for f, y in _batches(runners, _loader(dataset, batch_size, workers, pin_memory)):
            for name, rows in f.items():
                if name not in feats:  # the width of each runner's features is known at its first batch
                    feats[name] = np.empty((n, rows.shape[1]), dtype=np.float32)
                feats[name][start : start + len(y)] = rows
            labels[start : start + len(y)] = y
            start += len(y)
            bar.advance(task, len(y))
    return feats, labels


def embed(
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    workers: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Embed a dataset that fits in RAM: float32 features [N, D] and int64 labels [N]."""
    device = resolve_device(device)
    with _eval_mode(model, device), torch.inference_mode():
        feats, labels = embed_with(
            {"model": _runner(model, device)}, dataset, batch_size, workers, progress, pin_memory=device.type == "cuda"
        )
    return feats["model"], labels


# --------------------------------------------------------------------------- on-disk store


def _shard_names(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.npy", f"shard-{i:05d}.labels.npy"


def _shard_complete(root: Path, i: int, rows: int) -> bool:
    """A shard counts as done when both files exist with the expected row count."""
    feat_name, label_name = _shard_names(i)
    try:
        f = np.load(root / feat_name, mmap_mode="r")
        y = np.load(root / label_name, mmap_mode="r")
    except (FileNotFoundError, ValueError, OSError):
        return False
    return f.ndim == 2 and f.shape[0] == rows and f.dtype == STORE_DTYPE and y.shape == (rows,)


def _embed_shard(model, dataset, root: Path, i: int, lo: int, hi: int, batch_size, workers, device, on_batch) -> None:
    """Embed rows [lo, hi) into shard i, streaming into a temp memmap renamed into place at the end.

    Labels are renamed into place first: the features file is the shard's commit marker.
    """
    feat_name, label_name = _shard_names(i)
    labels = np.empty(hi - lo, dtype=np.int64)
    loader = _loader(Subset(dataset, range(lo, hi)), batch_size, workers, device.type == "cuda")
    with atomic_path(root / feat_name) as feat_tmp:
        out = None
        row = 0
        for f, y in _batches({"model": _runner(model, device)}, loader):
            f = f["model"]
            if out is None:
                out = np.lib.format.open_memmap(feat_tmp, mode="w+", dtype=STORE_DTYPE, shape=(hi - lo, f.shape[1]))
            out[row : row + len(f)] = f
            labels[row : row + len(f)] = y
            row += len(f)
            on_batch(len(f))
        out.flush()
        del out
        with atomic_path(root / label_name) as label_tmp:
            with open(label_tmp, "wb") as fh:
                np.save(fh, labels)


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _prepare_dir(root: Path, plan: dict) -> None:
    """Keep shards only if they were made under the same plan; otherwise clear the stale ones."""
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob(".shard-*.tmp"):  # partial shards of a killed run
        p.unlink()
    plan_path = root / PLAN_NAME
    if plan_path.exists() and json.loads(plan_path.read_text()) == plan:
        return
    (root / INDEX_NAME).unlink(missing_ok=True)  # first: an index must never list a deleted shard
    for p in root.iterdir():
        if p.name.startswith("shard-"):
            p.unlink()
    write_json(plan_path, plan)


def extract(
    model: torch.nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    batch_size: int = 256,
    shard_size: int = 65536,
    device: str | torch.device | None = None,
    workers: int = 0,
    fingerprint: str = "",
    progress: bool = True,
) -> FeatureStore:
    """Embed a dataset into fp16 shards under out_dir, resuming completed shards.

    `fingerprint` identifies the inputs (model weights, data, preprocessing):
    shards left by a run with another fingerprint or shard size are discarded.
    Under torch.distributed each rank embeds a contiguous slice of the shards and
    rank 0 writes index.json after all ranks finish.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot extract features of an empty dataset")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    root = Path(out_dir)
    rank, world = _distributed()
    plan = {"n": n, "shard_size": shard_size, "fingerprint": fingerprint}
    if rank == 0:
        _prepare_dir(root, plan)
    _barrier()

    num_shards = math.ceil(n / shard_size)
    mine = np.array_split(np.arange(num_shards), world)[rank].tolist()
    bounds = {i: (i * shard_size, min(n, (i + 1) * shard_size)) for i in mine}
    todo = [i for i in mine if not _shard_complete(root, i, bounds[i][1] - bounds[i][0])]

    if todo:
        device = resolve_device(device)
        total = sum(bounds[i][1] - bounds[i][0] for i in todo)
        with _eval_mode(model, device), torch.inference_mode(), _progress(progress and rank == 0) as bar:
            task = bar.add_task(f"extract ({len(todo)} shards)", total=total)
            for i in todo:
                lo, hi = bounds[i]
                _embed_shard(
                    model, dataset, root, i, lo, hi, batch_size, workers, device, lambda k: bar.advance(task, k)
                )

    _barrier()
    if rank == 0:
        _write_index(root, n, num_shards, shard_size, fingerprint)
    _barrier()
    return FeatureStore.open(root)


def _write_index(root: Path, n: int, num_shards: int, shard_size: int, fingerprint: str) -> None:
    shards = []
    dim = None
    for i in range(num_shards):
        rows = min(n, (i + 1) * shard_size) - i * shard_size
        if not _shard_complete(root, i, rows):
            raise RuntimeError(f"shard {i} in {root} is missing or incomplete after extraction")
        feat_name, label_name = _shard_names(i)
        d = np.load(root / feat_name, mmap_mode="r").shape[1]
        if dim is not None and d != dim:
            raise RuntimeError(f"shard {i} in {root} has dim {d}, shard 0 has {dim}")
        dim = d
        shards.append({"features": feat_name, "labels": label_name, "n": rows})
    index = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "n": n,
        "dim": dim,
        "dtype": np.dtype(STORE_DTYPE).name,
        "shard_size": shard_size,
        "fingerprint": fingerprint,
        "shards": shards,
    }
    write_json(root / INDEX_NAME, index)


def _as_float32(pieces: list[np.ndarray]) -> np.ndarray:
    """Join fp16 slices into one float32 block with a single copy when the block lies in one shard."""
    if len(pieces) == 1:
        return pieces[0].astype(np.float32)
    out = np.empty((sum(len(p) for p in pieces), pieces[0].shape[1]), dtype=np.float32)
    row = 0
    for p in pieces:
        out[row : row + len(p)] = p
        row += len(p)
    return out


@dataclass(frozen=True, eq=False)
class FeatureStore:
    """Read-only view of an extracted feature directory; shards are memory-mapped, never loaded whole."""

    root: Path
    n: int
    dim: int
    fingerprint: str
    shard_features: tuple[np.ndarray, ...]
    shard_labels: tuple[np.ndarray, ...]

    @classmethod
    def open(cls, root: str | os.PathLike) -> FeatureStore:
        root = Path(root)
        index_path = root / INDEX_NAME
        if not index_path.exists():
            raise DataError(f"no {INDEX_NAME} in {root}: not a finished feature store")
        try:
            index = json.loads(index_path.read_text())
        except ValueError:
            index = None
        if not isinstance(index, dict) or index.get("format") != STORE_FORMAT or index.get("version") != STORE_VERSION:
            raise DataError(f"{index_path} is not a {STORE_FORMAT} v{STORE_VERSION} index")
        feats, labels = [], []
        for s in index["shards"]:
            try:
                f = np.load(root / s["features"], mmap_mode="r", allow_pickle=False)
                y = np.load(root / s["labels"], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"shard {s['features']} in {root} is missing or unreadable "
                    f"({exc.__class__.__name__}); extract the features again"
                ) from None
            if f.shape != (s["n"], index["dim"]) or y.shape != (s["n"],):
                raise DataError(f"shard {s['features']} in {root} does not match {INDEX_NAME}")
            feats.append(f)
            labels.append(y)
        if sum(len(f) for f in feats) != index["n"]:
            raise DataError(f"shards in {root} do not add up to n={index['n']}")
        return cls(root, index["n"], index["dim"], index["fingerprint"], tuple(feats), tuple(labels))

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> np.ndarray:
        """All labels, int64 [N] (8 bytes per row: small even for ImageNet)."""
        return np.concatenate([np.asarray(y) for y in self.shard_labels])

    def batches(self, batch_size: int = 65536) -> Iterator[np.ndarray]:
        """Consecutive float32 blocks of `batch_size` rows (the last may be shorter), across shard borders."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        pending: list[np.ndarray] = []
        have = 0
        for shard in self.shard_features:
            pos = 0
            while pos < len(shard):
                take = min(batch_size - have, len(shard) - pos)
                pending.append(shard[pos : pos + take])
                have += take
                pos += take
                if have == batch_size:
                    yield _as_float32(pending)
                    pending, have = [], 0
        if have:
            yield _as_float32(pending)

    def to_array(self) -> np.ndarray:
        """All features as one float32 array; for sets that fit in RAM."""
        out = np.empty((self.n, self.dim), dtype=np.float32)
        row = 0
        for shard in self.shard_features:
            out[row : row + len(shard)] = shard
            row += len(shard)
        return out
