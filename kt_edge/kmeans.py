"""k-means at the papers' scale: PCA-whitening, Lloyd's iterations and nearest-centroid assignment.

The recipe of Noroozi et al. (CVPR 2018) and DeepCluster: teacher features -> optional PCA-whitening
-> L2 normalisation -> k-means (20 iterations) -> the nearest centroid of every image is its
pseudo-label. The preprocessing is saved with the centroids so another dataset (Noroozi clustered
ImageNet and labelled Places) is assigned through exactly the same transform. Inputs are arrays or
a ``FeatureStore``; large stores are only ever read in batches or as a bounded sample.

Three engines run the same algorithm (faiss's: k random training points as the first centroids,
``niter`` iterations, an empty cluster refilled by splitting a large one):

- ``faiss-gpu``: faiss on every GPU it sees (a faiss-gpu build);
- ``torch``: Lloyd's iterations as matrix products in torch, on the GPU when there is one (no faiss-gpu
  needed); under torchrun every rank holds a share of the sample and the sums are all-reduced, so no
  rank waits on another's long CPU work;
- ``faiss-cpu``: faiss on the CPU, with one thread per core available (torchrun sets OMP_NUM_THREADS=1).

faiss is imported only when it runs, so a GPU machine without it (faiss-gpu wheels need CUDA 12) clusters
with torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from kt_edge.atomic import atomic_path, write_json
from kt_edge.engine import distributed
from kt_edge.features import FeatureStore

Source = np.ndarray | FeatureStore
UseGpu = bool | Literal["auto"]
CENTROIDS_FORMAT = "kt-edge-centroids"
CENTROIDS_VERSION = 1
DEFAULT_BATCH = 65536
SPLIT_EPS = 1 / 1024  # faiss's perturbation of a split centroid

log = logging.getLogger(__name__)
_cpu_fallback_reported = False


# --------------------------------------------------------------------------- reading sources


def _rows(source: Source) -> int:
    return source.n if isinstance(source, FeatureStore) else len(source)


def _iter_batches(source: Source, batch_size: int):
    """float32 blocks of a store or an array, without materialising the whole source."""
    if isinstance(source, FeatureStore):
        yield from source.batches(batch_size)
        return
    if source.ndim != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {source.shape}")
    for lo in range(0, len(source), batch_size):
        yield np.ascontiguousarray(source[lo : lo + batch_size], dtype=np.float32)


def sample_rows(source: Source, m: int, seed: int = 0, part: tuple[int, int] = (0, 1)) -> np.ndarray:
    """A seeded uniform sample of min(m, N) rows as float32, in source order; reads only those rows.

    ``part`` (i, parts): only the i-th of ``parts`` contiguous slices of that sample (a rank's share).
    """
    n = _rows(source)
    idx = np.arange(n) if m >= n else np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    idx = np.array_split(idx, part[1])[part[0]]
    if not isinstance(source, FeatureStore):
        return np.ascontiguousarray(source[idx], dtype=np.float32)
    out = np.empty((len(idx), source.dim), dtype=np.float32)
    row = start = 0
    for shard in source.shard_features:
        lo, hi = np.searchsorted(idx, [start, start + len(shard)])
        out[row : row + hi - lo] = shard[idx[lo:hi] - start]
        row += hi - lo
        start += len(shard)
    return out


# --------------------------------------------------------------------------- preprocessing


def l2_normalize(x: np.ndarray, batch_size: int = DEFAULT_BATCH, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm, as a new float32 array, computed block by block."""
    out = np.array(x, dtype=np.float32, copy=True)
    for lo in range(0, len(out), batch_size):
        block = out[lo : lo + batch_size]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), eps)
    return out


@dataclass(frozen=True, eq=False)
class PCAWhitening:
    """y = A x + b: projection on the top `d_out` principal axes, each scaled by eigenvalue**eigen_power.

    Fit with faiss.PCAMatrix (eigen_power -0.5 as DeepCluster). faiss builds it from
    the unnormalised scatter matrix, so its whitened output has covariance I/n; A and b
    are rescaled here to give unit covariance whatever the sample size.
    """

    A: np.ndarray  # [d_out, d_in] float32
    b: np.ndarray  # [d_out] float32
    eigen_power: float = -0.5

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.A.shape[0]

    @classmethod
    def fit(
        cls, source: Source, dim: int, eigen_power: float = -0.5, max_samples: int = 131072, seed: int = 0
    ) -> PCAWhitening:
        x = sample_rows(source, max_samples, seed)
        n, d_in = x.shape
        if not 0 < dim <= d_in:
            raise ValueError(f"PCA dim must be in 1..{d_in} (the feature dim), got {dim}")
        if n <= dim:
            raise ValueError(f"PCA to {dim} dims needs more than {dim} samples, got {n}")
        import faiss

        pca = faiss.PCAMatrix(d_in, dim, eigen_power)
        pca.train(x)
        scale = np.float32(n ** (-eigen_power))
        A = faiss.vector_to_array(pca.A).reshape(dim, d_in) * scale
        b = faiss.vector_to_array(pca.b) * scale
        if not (np.isfinite(A).all() and np.isfinite(b).all()):
            raise ValueError(f"PCA-whitening to {dim} dims is singular: the features have rank below {dim}")
        return cls(A.astype(np.float32), b.astype(np.float32), eigen_power)

    def apply(self, x: np.ndarray, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """Transform rows block by block (works on memory-mapped input)."""
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"PCA expects features of dim {self.d_in}, got shape {x.shape}")
        out = np.empty((len(x), self.d_out), dtype=np.float32)
        for lo in range(0, len(x), batch_size):
            out[lo : lo + batch_size] = np.asarray(x[lo : lo + batch_size], dtype=np.float32) @ self.A.T + self.b
        return out


@dataclass(frozen=True, eq=False)
class Preprocessing:
    """What is done to features before clustering and before assignment: PCA-whitening, then L2 norm."""

    pca: PCAWhitening | None = None
    normalize: bool = True

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.pca is not None:
            x = self.pca.apply(x)
        return l2_normalize(x) if self.normalize else np.ascontiguousarray(x, dtype=np.float32)

    def to_dict(self) -> dict:
        pca = None
        if self.pca is not None:
            pca = {"d_in": self.pca.d_in, "d_out": self.pca.d_out, "eigen_power": self.pca.eigen_power}
        return {"pca": pca, "l2_normalize": self.normalize}


# --------------------------------------------------------------------------- engines


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def engine(use_gpu: UseGpu = "auto", collective: bool = False) -> str:
    """Which engine runs: ``faiss-gpu``, ``torch`` (on this process's device) or ``faiss-cpu``.

    auto: faiss's GPUs, else torch on CUDA, else faiss on the CPU (said once); True: a GPU engine or an
    error; False: faiss on the CPU. ``collective`` (every rank of a torchrun group takes part): ``torch``.
    """
    global _cpu_fallback_reported
    if collective and distributed.active():
        return "torch"
    faiss = _faiss()
    gpu = "faiss-gpu" if faiss and faiss.get_num_gpus() > 0 else "torch" if torch.cuda.is_available() else None
    if faiss is None:
        if gpu is None:
            raise RuntimeError("k-means on this machine needs faiss (pip install faiss-cpu) or a CUDA GPU")
        return gpu
    if use_gpu is False:
        return "faiss-cpu"
    if use_gpu is True and gpu is None:
        raise RuntimeError("cluster.use_gpu is true, but neither faiss nor torch sees a GPU")
    if gpu is None and not _cpu_fallback_reported:
        log.warning("no GPU for k-means (faiss-cpu build, no CUDA device): faiss runs on the CPU, %d threads", cores())
        _cpu_fallback_reported = True
    return gpu or "faiss-cpu"


def _faiss():
    """The faiss module, or None where it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """Centroids and how they were obtained.

    ``objective_history`` is the sum of squared distances of the training points to their nearest centroid
    at each iteration, before the centroids move (faiss's ``obj``); faiss may stop early once it no longer
    changes, so its length is the number of iterations run.
    """

    centroids: np.ndarray  # [k, d] float32
    objective_history: list[float]
    seconds: float
    n_train: int
    engine: str

    @property
    def objective(self) -> float:
        return self.objective_history[-1]


def fit_kmeans(
    x: np.ndarray | torch.Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    use_gpu: UseGpu = "auto",
    collective: bool = False,
    engine_name: str | None = None,
) -> KMeansResult:
    """k-means of the training points ``x``, by the engine ``use_gpu`` picks, or by ``engine_name``
    (``faiss-cpu``, ``faiss-gpu``, ``torch``) to compare them. ``collective``: every rank of a torchrun group
    calls it with its share of the points. ``x`` may be a torch tensor already on the GPU (torch engine)."""
    collective = collective and distributed.active()
    n = int(distributed.all_reduce_sum(torch.tensor(len(x), device=_device()))) if collective else len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of points), got {k}")
    chosen = engine_name or engine(use_gpu, collective)
    started = time.perf_counter()
    if chosen == "torch":
        centroids, history = _torch_kmeans(x, k, niter, seed, n, collective)
    else:
        import faiss

        faiss.omp_set_num_threads(cores())
        gpus = faiss.get_num_gpus() if chosen == "faiss-gpu" else False
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max(1, -(-n // k)), gpu=gpus)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        centroids, history = np.ascontiguousarray(km.centroids, dtype=np.float32), [float(v) for v in km.obj]
    return KMeansResult(centroids, history, time.perf_counter() - started, n, chosen)


def _torch_kmeans(
    x: np.ndarray | torch.Tensor, k: int, niter: int, seed: int, n: int, collective: bool
) -> tuple[np.ndarray, list[float]]:
    """Lloyd's iterations in torch: assignment as one matrix product per block; ``collective``: the sums are
    all-reduced over the ranks, each holding a share of the points."""
    device = _device()
    points = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).to(
        device, torch.float32
    )
    total = distributed.all_reduce_sum if collective else (lambda t: t)
    offset = 0
    if collective:  # this rank's first row in the global order
        offset = sum(
            distributed.concat_all_gather(torch.tensor([len(points)], device=device)).tolist()[: distributed.rank()]
        )
    first = first_centroids(n, k, seed)
    mine = (first >= offset) & (first < offset + len(points))
    centroids = torch.zeros(k, points.shape[1], device=device)
    centroids[torch.from_numpy(np.flatnonzero(mine)).to(device)] = points[
        torch.from_numpy(first[mine] - offset).to(device)
    ]
    centroids = total(centroids)
    rng, history = np.random.default_rng(seed + 1), []
    for _ in range(niter):
        sums, counts, objective = (
            torch.zeros_like(centroids),
            torch.zeros(k, device=device),
            torch.zeros((), device=device),
        )
        c2 = (centroids * centroids).sum(1)
        for lo in range(0, len(points), DEFAULT_BATCH):
            block = points[lo : lo + DEFAULT_BATCH]
            distance = (block * block).sum(1, keepdim=True) - 2 * block @ centroids.T + c2
            nearest, label = distance.min(1)
            sums.index_add_(0, label, block)
            counts += torch.bincount(label, minlength=k).float()
            objective += nearest.clamp_min(0).sum()
        sums, counts, objective = (total(t) for t in (sums, counts, objective))
        history.append(float(objective))
        sizes = counts.cpu().numpy()
        centroids = torch.where((counts > 0)[:, None], sums / counts.clamp_min(1)[:, None], centroids)
        centroids = _split_empty(centroids, sizes, n, rng)
    return centroids.cpu().numpy(), history


def first_centroids(n: int, k: int, seed: int) -> np.ndarray:
    """The rows whose points start as centroids: k distinct training points drawn with the seed, as faiss does."""
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def _split_empty(centroids: torch.Tensor, sizes: np.ndarray, n: int, rng: np.random.Generator) -> torch.Tensor:
    """faiss's rule for an empty cluster: copy a cluster drawn with probability (size - 1) / (n - k), and move
    the two copies apart by a small symmetric perturbation; the drawn cluster's points are taken as halved."""
    k = len(centroids)
    if sizes.min() > 0 or n <= k:
        return centroids
    centroids, sizes = centroids.clone(), sizes.copy()
    sign = torch.ones(centroids.shape[1], device=centroids.device)
    sign[1::2] = -1
    for empty in np.flatnonzero(sizes == 0):
        donor = 0
        while rng.random() >= (sizes[donor] - 1) / (n - k):
            donor = (donor + 1) % k
        centroids[empty] = centroids[donor] * (1 + SPLIT_EPS * sign)
        centroids[donor] = centroids[donor] * (1 - SPLIT_EPS * sign)
        sizes[empty] = sizes[donor] // 2
        sizes[donor] -= sizes[empty]
    return centroids


def assign(
    source: Source,
    centroids: np.ndarray,
    batch_size: int = DEFAULT_BATCH,
    preprocess: Preprocessing | None = None,
    use_gpu: UseGpu = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every row: int64 labels [N] and float32 squared distances [N], streamed."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    chosen = engine(use_gpu)
    if chosen == "torch":
        device = _device()
        table = torch.from_numpy(centroids).to(device)
        c2 = (table * table).sum(1)

        def search(block):
            rows = torch.from_numpy(block).to(device)
            nearest, label = ((rows * rows).sum(1, keepdim=True) - 2 * rows @ table.T + c2).min(1)
            return nearest.clamp_min(0).cpu().numpy(), label.cpu().numpy()
    else:
        import faiss

        faiss.omp_set_num_threads(cores())
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        if chosen == "faiss-gpu":
            index = faiss.index_cpu_to_all_gpus(index)

        def search(block):
            d, i = index.search(block, 1)
            return d[:, 0], i[:, 0]

    n = _rows(source)
    labels, distances = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
    row = 0
    for block in _iter_batches(source, batch_size):
        if preprocess is not None:
            block = preprocess(block)
        if block.shape[1] != centroids.shape[1]:
            raise ValueError(f"features have dim {block.shape[1]} after preprocessing, centroids {centroids.shape[1]}")
        distances[row : row + len(block)], labels[row : row + len(block)] = search(block)
        row += len(block)
    return labels, distances


# --------------------------------------------------------------------------- fitted model, save


@dataclass(frozen=True, eq=False)
class ClusterModel:
    """Centroids plus the preprocessing they live after: everything needed to label new features."""

    centroids: np.ndarray
    preprocess: Preprocessing = field(default_factory=Preprocessing)
    meta: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.centroids)

    def assign(self, source: Source, use_gpu: UseGpu = False) -> tuple[np.ndarray, np.ndarray]:
        return assign(source, self.centroids, preprocess=self.preprocess, use_gpu=use_gpu)


def fit_clusters(
    source: Source,
    k: int,
    pca_dim: int | None = None,
    normalize: bool = True,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: UseGpu = "auto",
    collective: bool = False,
) -> tuple[ClusterModel, KMeansResult]:
    """The full recipe: one bounded sample -> fit PCA-whitening on it -> preprocess -> k-means.

    ``collective``: every rank of a torchrun group calls it, and each reads and clusters its share of the sample.
    """
    m = min(_rows(source), k * max_points_per_centroid)
    shared = collective and distributed.active()
    part = (distributed.rank(), distributed.world_size()) if shared else (0, 1)
    sample = sample_rows(source, m, seed, part=part)
    pca = None
    if pca_dim:  # fitted on the whole sample, the same on every rank
        pca = PCAWhitening.fit(sample_rows(source, m, seed) if shared else sample, pca_dim, seed=seed)
    prep = Preprocessing(pca, normalize)
    result = fit_kmeans(prep(sample), k, niter=niter, seed=seed, use_gpu=use_gpu, collective=collective)
    meta = {
        "k": k,
        "niter": niter,
        "seed": seed,
        "n_train": result.n_train,
        "objective": result.objective,
        "seconds": result.seconds,
        "engine": result.engine,
    }
    if isinstance(source, FeatureStore):
        meta["features_fingerprint"] = source.fingerprint
    return ClusterModel(result.centroids, prep, meta), result


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_centroids(path: str | os.PathLike, model: ClusterModel) -> Path:
    """Write `<path>.npy` centroids, the PCA matrix if any, then the JSON sidecar last (its presence = complete)."""
    path = Path(path).with_suffix(".npy")
    _sidecar(path).unlink(missing_ok=True)  # an old sidecar must not vouch for half-written new files
    _save_npy_atomic(path, np.ascontiguousarray(model.centroids, dtype=np.float32))
    prep = model.preprocess.to_dict()
    if model.preprocess.pca is not None:
        pca_a = path.with_name(path.stem + ".pca_A.npy")
        pca_b = path.with_name(path.stem + ".pca_b.npy")
        _save_npy_atomic(pca_a, model.preprocess.pca.A)
        _save_npy_atomic(pca_b, model.preprocess.pca.b)
        prep["pca"].update({"A": pca_a.name, "b": pca_b.name})
    doc = {
        "format": CENTROIDS_FORMAT,
        "version": CENTROIDS_VERSION,
        "centroids": path.name,
        "k": int(model.centroids.shape[0]),
        "dim": int(model.centroids.shape[1]),
        "metric": "l2",
        "preprocess": prep,
        "meta": model.meta,
    }
    write_json(_sidecar(path), doc)
    return path
