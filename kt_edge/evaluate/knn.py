"""Weighted k-NN classification of embeddings (InstDisc / SEED protocol).

Features are L2-normalised, neighbours ranked by cosine similarity, and each
of the k neighbours votes for its label with weight exp(sim / t). Several
(k, t) settings share one neighbour search done with the largest k, since the
k nearest neighbours are a prefix of the largest-k list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Above this many train x test similarity pairs on the CPU, search with faiss (where it is installed) instead
# of a batched torch matmul; on a GPU torch's matmul does every search. All searches are exact.
FAISS_MIN_PAIRS = 10**8


@dataclass(frozen=True)
class KnnSetting:
    """One k-NN setting: neighbour count k and vote temperature t."""

    k: int
    t: float

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k-NN k must be >= 1, got {self.k}")
        if not self.t > 0:
            raise ValueError(f"k-NN temperature t must be > 0, got {self.t}")

    @property
    def name(self) -> str:
        """Metric name, e.g. 'knn_k200_t0.1'."""
        return f"knn_k{self.k}_t{self.t:g}"


DEFAULT_SETTINGS = (KnnSetting(200, 0.1), KnnSetting(20, 0.07), KnnSetting(1, 0.07))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm as contiguous float32 (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_inputs(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2:
        raise ValueError(f"k-NN features must be 2-D, got train {train_x.shape} and test {test_x.shape}")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"k-NN feature dims differ: train {train_x.shape[1]} vs test {test_x.shape[1]}")
    if train_y.shape != (train_x.shape[0],):
        raise ValueError(f"k-NN train labels shape {train_y.shape} does not match {train_x.shape[0]} train rows")
    if not np.issubdtype(train_y.dtype, np.integer) or (train_y.size and train_y.min() < 0):
        raise ValueError("k-NN train labels must be non-negative integers")


def nearest_neighbors(
    train_x: np.ndarray, test_x: np.ndarray, k: int, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities and indices of the k nearest train rows for each test row, most similar first."""
    train = l2_normalize(train_x)
    test = l2_normalize(test_x)
    if k > train.shape[0]:
        raise ValueError(f"k-NN k={k} exceeds the {train.shape[0]} training samples")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and train.shape[0] * test.shape[0] > FAISS_MIN_PAIRS and _has_faiss():
        return _faiss_search(train, test, k)
    train_t = torch.from_numpy(train).to(device)
    sims, idx = [], []
    with torch.no_grad():
        for start in range(0, test.shape[0], batch_size):
            batch = torch.from_numpy(test[start : start + batch_size]).to(device)
            s, i = torch.topk(batch @ train_t.T, k, dim=1)
            sims.append(s.cpu().numpy())
            idx.append(i.cpu().numpy())
    if not sims:
        return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(idx)


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_search(train: np.ndarray, test: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search with faiss IndexFlatIP on the CPU, every core taking part."""
    import faiss

    from kt_edge.kmeans import cores

    faiss.omp_set_num_threads(cores())
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    sims, idx = index.search(test, k)
    return sims, idx.astype(np.int64)


def weighted_vote(sims: np.ndarray, neighbor_labels: np.ndarray, setting: KnnSetting, num_classes: int) -> np.ndarray:
    """Predicted class per row from its first setting.k neighbours, each weighted exp(sim / t).

    Ties go to the lowest class id. Weights are shifted by each row's top
    similarity before exp, which rescales a row's scores and keeps exp finite.
    """
    s = sims[:, : setting.k].astype(np.float64)
    labels = neighbor_labels[:, : setting.k]
    weights = np.exp((s - s[:, :1]) / setting.t)
    scores = np.zeros((s.shape[0], num_classes), np.float64)
    np.add.at(scores, (np.arange(s.shape[0])[:, None], labels), weights)
    return scores.argmax(axis=1)


def knn_classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    settings: tuple[KnnSetting, ...] = DEFAULT_SETTINGS,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> dict[KnnSetting, np.ndarray]:
    """Predictions for every setting from a single neighbour search with the largest k."""
    train_y = np.asarray(train_y)
    _check_inputs(np.asarray(train_x), train_y, np.asarray(test_x))
    if not settings:
        raise ValueError("k-NN needs at least one (k, t) setting")
    if num_classes is None:
        num_classes = int(train_y.max()) + 1
    elif train_y.max() >= num_classes:
        raise ValueError(f"k-NN label {int(train_y.max())} out of range for num_classes={num_classes}")
    sims, idx = nearest_neighbors(train_x, test_x, max(s.k for s in settings), batch_size)
    neighbor_labels = train_y.astype(np.int64)[idx]
    return {s: weighted_vote(sims, neighbor_labels, s, num_classes) for s in settings}


def knn_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    settings: tuple[KnnSetting, ...] = DEFAULT_SETTINGS,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> list[dict]:
    """Top-1 accuracy in percent per setting, as [{'k': 200, 't': 0.1, 'top1': 85.1}, ...]."""
    test_y = np.asarray(test_y)
    if test_y.shape != (np.asarray(test_x).shape[0],):
        raise ValueError(f"k-NN test labels shape {test_y.shape} does not match the test features")
    if test_y.size == 0:
        raise ValueError("k-NN accuracy needs at least one test sample")
    if num_classes is None:
        num_classes = int(max(np.asarray(train_y).max(), test_y.max())) + 1
    preds = knn_classify(train_x, train_y, test_x, settings, num_classes, batch_size)
    return [{"k": s.k, "t": s.t, "top1": float((preds[s] == test_y).mean() * 100.0)} for s in settings]
