"""Cluster teacher features with faiss k-means and assign pseudo-labels, streaming from disk.

The recipe of Noroozi et al. (CVPR 2018) and DeepCluster: teacher features ->
optional PCA-whitening -> L2 normalisation -> k-means (20 iterations) -> the
nearest centroid of every image is its pseudo-label. The preprocessing is
saved with the centroids so a different dataset (Noroozi clustered ImageNet
and labelled Places) is assigned through exactly the same transform.
Inputs are arrays or a `FeatureStore`; large stores are only ever read in
batches or as a bounded sample.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from kt_edge.atomic import atomic_path, write_json
from kt_edge.errors import DataError
from kt_edge.evaluate.clusters import ari, hungarian_accuracy, nmi
from kt_edge.features import FeatureStore

Source = np.ndarray | FeatureStore
CENTROIDS_FORMAT = "kt-edge-centroids"
CENTROIDS_VERSION = 1
DEFAULT_BATCH = 65536

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


def sample_rows(source: Source, m: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample of min(m, N) rows as float32, in source order; reads only those rows."""
    n = _rows(source)
    if m >= n:
        if isinstance(source, FeatureStore):
            return source.to_array()
        return np.ascontiguousarray(source, dtype=np.float32)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
    if not isinstance(source, FeatureStore):
        return np.ascontiguousarray(source[idx], dtype=np.float32)
    out = np.empty((m, source.dim), dtype=np.float32)
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


# --------------------------------------------------------------------------- k-means


def faiss_gpus(use_gpu: bool | int | Literal["auto"] = "auto") -> int:
    """Number of GPUs faiss should use: all for "auto"/True, n for an int, 0 for False."""
    global _cpu_fallback_reported
    available = faiss.get_num_gpus()
    if use_gpu == "auto":
        if available == 0 and not _cpu_fallback_reported:
            log.warning("faiss sees no GPU (faiss-cpu build or no visible device): k-means runs on the CPU")
            _cpu_fallback_reported = True
        return available
    if use_gpu is False:
        return 0
    wanted = available if use_gpu is True else int(use_gpu)
    if wanted < 0 or wanted > available or (use_gpu is True and available == 0):
        raise RuntimeError(f"use_gpu={use_gpu!r} but faiss sees {available} GPU(s)")
    return wanted


@dataclass(frozen=True, eq=False)
class KMeansResult:
    """Centroids and how they were obtained.

    `objective` is faiss's sum of squared distances on the training sample at the last
    iteration; faiss stops before `niter` once the objective no longer changes, so
    `iterations` is the number actually run.
    """

    centroids: np.ndarray  # [k, d] float32
    objective: float
    objective_history: list[float]
    seconds: float
    n_train: int
    k: int
    niter: int
    iterations: int
    seed: int
    gpus: int


def fit_kmeans(
    x: Source,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool | int | Literal["auto"] = "auto",
    verbose: bool = False,
    preprocess: Preprocessing | None = None,
) -> KMeansResult:
    """faiss k-means on at most k * max_points_per_centroid rows sampled with `seed` (then preprocessed)."""
    n = _rows(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of points), got {k}")
    train = sample_rows(x, k * max_points_per_centroid, seed)
    if preprocess is not None:
        train = preprocess(train)
    gpus = faiss_gpus(use_gpu)
    km = faiss.Kmeans(
        train.shape[1],
        k,
        niter=niter,
        seed=seed,
        verbose=verbose,
        max_points_per_centroid=max_points_per_centroid,
        gpu=gpus if gpus else False,
    )
    t0 = time.perf_counter()
    km.train(train)
    seconds = time.perf_counter() - t0
    history = [float(v) for v in km.obj]
    return KMeansResult(
        centroids=np.ascontiguousarray(km.centroids, dtype=np.float32),
        objective=history[-1],
        objective_history=history,
        seconds=seconds,
        n_train=len(train),
        k=k,
        niter=niter,
        iterations=len(history),
        seed=seed,
        gpus=gpus,
    )


def assign(
    source: Source,
    centroids: np.ndarray,
    batch_size: int = DEFAULT_BATCH,
    preprocess: Preprocessing | None = None,
    metric: Literal["l2", "ip"] = "l2",
    use_gpu: bool | int | Literal["auto"] = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: int64 labels [N] and float32 scores [N].

    Scores are squared L2 distances for metric "l2" and inner products for "ip".
    """
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if metric == "l2":
        index = faiss.IndexFlatL2(centroids.shape[1])
    elif metric == "ip":
        index = faiss.IndexFlatIP(centroids.shape[1])
    else:
        raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
    index.add(centroids)
    gpus = faiss_gpus(use_gpu)
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=gpus)
    n = _rows(source)
    labels = np.empty(n, dtype=np.int64)
    scores = np.empty(n, dtype=np.float32)
    row = 0
    for block in _iter_batches(source, batch_size):
        if preprocess is not None:
            block = preprocess(block)
        if block.shape[1] != centroids.shape[1]:
            raise ValueError(f"features have dim {block.shape[1]} after preprocessing, centroids {centroids.shape[1]}")
        d, i = index.search(block, 1)
        labels[row : row + len(block)] = i[:, 0]
        scores[row : row + len(block)] = d[:, 0]
        row += len(block)
    return labels, scores


# --------------------------------------------------------------------------- fitted model, save / load


@dataclass(frozen=True, eq=False)
class ClusterModel:
    """Centroids plus the preprocessing they live after: everything needed to label new features."""

    centroids: np.ndarray
    preprocess: Preprocessing = field(default_factory=Preprocessing)
    meta: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.centroids)

    def assign(self, source: Source, batch_size: int = DEFAULT_BATCH) -> tuple[np.ndarray, np.ndarray]:
        return assign(source, self.centroids, batch_size=batch_size, preprocess=self.preprocess)


def fit_clusters(
    source: Source,
    k: int,
    pca_dim: int | None = None,
    normalize: bool = True,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool | int | Literal["auto"] = "auto",
    verbose: bool = False,
) -> tuple[ClusterModel, KMeansResult]:
    """The full recipe: one bounded sample -> fit PCA-whitening on it -> preprocess -> k-means."""
    sample = sample_rows(source, k * max_points_per_centroid, seed)
    pca = PCAWhitening.fit(sample, pca_dim, seed=seed) if pca_dim else None
    prep = Preprocessing(pca, normalize)
    result = fit_kmeans(
        prep(sample), k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
        use_gpu=use_gpu, verbose=verbose,
    )
    meta = {
        "k": k, "niter": niter, "seed": seed, "n_train": result.n_train, "objective": result.objective,
        "seconds": result.seconds, "gpus": result.gpus,
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


def load_centroids(path: str | os.PathLike) -> ClusterModel:
    """Read what `save_centroids` wrote, checking shapes against the sidecar."""
    path = Path(path).with_suffix(".npy")
    side = _sidecar(path)
    if not side.exists():
        raise DataError(f"no centroid sidecar {side}: centroids missing or not completely saved")
    doc = json.loads(side.read_text())
    if doc.get("format") != CENTROIDS_FORMAT or doc.get("version") != CENTROIDS_VERSION:
        raise DataError(f"{side} is not a {CENTROIDS_FORMAT} v{CENTROIDS_VERSION} file")
    centroids = np.load(path.with_name(doc["centroids"]))
    if centroids.shape != (doc["k"], doc["dim"]):
        raise DataError(f"{path} has shape {centroids.shape}, sidecar says ({doc['k']}, {doc['dim']})")
    pca = None
    if doc["preprocess"]["pca"] is not None:
        p = doc["preprocess"]["pca"]
        pca = PCAWhitening(np.load(path.with_name(p["A"])), np.load(path.with_name(p["b"])), p["eigen_power"])
        if (pca.d_out, pca.d_in) != (p["d_out"], p["d_in"]):
            raise DataError(f"PCA matrix of {path} does not match its sidecar")
    return ClusterModel(centroids, Preprocessing(pca, doc["preprocess"]["l2_normalize"]), doc["meta"])


# --------------------------------------------------------------------------- report


def cluster_report(assignments: np.ndarray, labels: np.ndarray | None = None, k: int | None = None) -> dict:
    """Cluster sizes (balance, empty clusters) and, given labels (>= 0 = labelled), NMI / ARI / Hungarian accuracy."""
    assignments = np.asarray(assignments, dtype=np.int64)
    if assignments.ndim != 1 or len(assignments) == 0:
        raise ValueError(f"assignments must be a non-empty 1-D array, got shape {assignments.shape}")
    k = int(assignments.max()) + 1 if k is None else k
    if assignments.min() < 0 or assignments.max() >= k:
        raise ValueError(f"assignments must lie in 0..{k - 1}")
    sizes = np.bincount(assignments, minlength=k)
    edges = np.unique(np.geomspace(1, max(sizes.max(), 1) + 1, num=12).astype(np.int64))
    counts, _ = np.histogram(sizes[sizes > 0], bins=edges)
    report = {
        "n": int(len(assignments)),
        "k": k,
        "empty_clusters": int((sizes == 0).sum()),
        "size_min": int(sizes.min()),
        "size_median": float(np.median(sizes)),
        "size_max": int(sizes.max()),
        "largest_fraction": float(sizes.max() / len(assignments)),
        "size_histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
    }
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != assignments.shape:
            raise ValueError(f"labels shape {labels.shape} differs from assignments shape {assignments.shape}")
        known = labels >= 0
        if known.any():
            pred, true = assignments[known], labels[known]
            report.update(
                labelled=int(known.sum()),
                nmi=nmi(pred, true),
                ari=ari(pred, true),
                hungarian_accuracy=hungarian_accuracy(pred, true),
            )
    return report
