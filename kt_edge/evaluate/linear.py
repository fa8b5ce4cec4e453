"""Linear probes on frozen embeddings, with all labels or a class-balanced few.

The probe is multinomial logistic regression on features cached by the
caller, fitted with full-batch L-BFGS from a zero start, so the same inputs
always give the same classifier (no learning rate, no shuffling). The best
weight decay differs by orders of magnitude between feature sets, so by
default it is picked from a grid on a seeded held-out part of the train set
and the probe is then refitted on all of it. Optional CompRess normalisation
(L2-normalise, then standardise with the train set's mean and variance) puts
features of any scale on one footing. `kt_edge.evaluate.protocols` runs these
probes for a recipe, on its own data or a transfer dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kt_edge.evaluate.knn import l2_normalize

BN_EPS = 1e-5
WEIGHT_DECAYS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
VALIDATION_FRACTION = 0.2
# CPU probes with fewer multiply-adds per L-BFGS step (rows x dims x classes) fit on one thread: their
# matmuls are too small to split, and on a busy 2-core host two threads made each step ~16x slower.
ONE_THREAD_MACS = 10**8


@dataclass(frozen=True)
class ProbeResult:
    """Test accuracy of a fitted probe in percent, its labelled train size and weight decay."""

    top1: float
    top5: float
    num_train: int
    weight_decay: float


def compress_normalize(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise both sets, then standardise each dim with the train set's mean and unbiased variance."""
    train = l2_normalize(train_x)
    test = l2_normalize(test_x)
    mean = train.mean(axis=0)
    var = train.var(axis=0, ddof=1) if train.shape[0] > 1 else np.zeros_like(mean)
    inv_std = 1.0 / np.sqrt(var + BN_EPS)
    return (train - mean) * inv_std, (test - mean) * inv_std


def _check_split(name: str, x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2:
        raise ValueError(f"linear probe {name} features must be 2-D, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"linear probe {name} labels shape {y.shape} does not match {x.shape[0]} rows")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and y.min() < 0):
        raise ValueError(f"linear probe {name} labels must be non-negative integers")
    if y.size == 0:
        raise ValueError(f"linear probe {name} set is empty")


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int):
    """Weights and bias minimising mean cross-entropy + weight_decay/2 * |W|^2, from a zero start."""
    weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


@contextmanager
def _threads_for(x: torch.Tensor, num_classes: int) -> Iterator[None]:
    """One torch thread while fitting a small probe on the CPU; the previous count after."""
    if x.device.type != "cpu" or x.numel() * num_classes >= ONE_THREAD_MACS:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _topk_hits(x: torch.Tensor, y: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    """(N, min(5, C)) booleans: is the label the j-th highest scoring class."""
    with torch.no_grad():
        topk = F.linear(x, weight, bias).topk(min(5, weight.shape[0]), dim=1).indices.cpu().numpy()
    return topk == y[:, None]


def validation_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded class-stratified (fit, held-out) index split.

    Each class with n >= 2 samples holds out max(1, floor(fraction * n)) of
    them, at most n - 1, so every class keeps a sample to fit on.
    """
    rng = np.random.default_rng(seed)
    held = [np.empty(0, np.int64)]
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = min(members.size - 1, max(1, int(fraction * members.size)))
        held.append(rng.choice(members, count, replace=False))
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(labels.size), held_out), held_out


def _select_weight_decay(
    x: torch.Tensor, y: np.ndarray, num_classes: int, grid: tuple[float, ...], max_iter: int, seed: int
) -> float:
    """Grid value with the best held-out top-1; ties go to the stronger decay.

    With one sample per class nothing can be held out, every value ties, and
    the strongest decay (close to a nearest-class-mean rule) is chosen.
    """
    fit_idx, val_idx = validation_split(y, VALIDATION_FRACTION, seed)
    if val_idx.size == 0:
        return max(grid)
    y_fit = torch.as_tensor(y[fit_idx], device=x.device)
    best, best_acc = grid[0], -1.0
    for wd in sorted(grid, reverse=True):
        weight, bias = _fit(x[fit_idx], y_fit, num_classes, wd, max_iter)
        acc = _topk_hits(x[val_idx], y[val_idx], weight, bias)[:, 0].mean()
        if acc > best_acc:
            best, best_acc = wd, acc
    return best


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    normalize: bool = True,
    weight_decay: float | tuple[float, ...] = WEIGHT_DECAYS,
    max_iter: int = 1000,
    num_classes: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> ProbeResult:
    """Fit softmax regression on train, score top-1/top-5 on test.

    weight_decay is one value, or a grid to choose from on a seeded
    class-stratified held-out part of train before refitting on all of it.
    """
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check_split("train", train_x, train_y)
    _check_split("test", test_x, test_y)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"linear probe feature dims differ: train {train_x.shape[1]} vs test {test_x.shape[1]}")
    grid = tuple(weight_decay) if isinstance(weight_decay, (tuple, list)) else (weight_decay,)
    if not grid or min(grid) < 0:
        raise ValueError(f"linear probe weight_decay must be >= 0 (or a non-empty grid of such), got {weight_decay}")
    labels_max = int(max(train_y.max(), test_y.max()))
    if num_classes is None:
        num_classes = labels_max + 1
    elif labels_max >= num_classes:
        raise ValueError(f"linear probe label {labels_max} out of range for num_classes={num_classes}")

    if normalize:
        train_x, test_x = compress_normalize(train_x, test_x)
    x = torch.as_tensor(np.ascontiguousarray(train_x, dtype=np.float32), device=device)
    y = train_y.astype(np.int64)
    with _threads_for(x, num_classes):
        chosen = grid[0] if len(grid) == 1 else _select_weight_decay(x, y, num_classes, grid, max_iter, seed)
        weight, bias = _fit(x, torch.as_tensor(y, device=device), num_classes, chosen, max_iter)
    test = torch.as_tensor(np.ascontiguousarray(test_x, dtype=np.float32), device=device)
    hits = _topk_hits(test, test_y, weight, bias)
    return ProbeResult(
        top1=float(hits[:, 0].mean() * 100.0),
        top5=float(hits.any(axis=1).mean() * 100.0),
        num_train=len(train_y),
        weight_decay=float(chosen),
    )


def few_label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded class-balanced sample: round(fraction * N / C) per class, at least one."""
    labels = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"few-label fraction must be in (0, 1], got {fraction}")
    classes, counts = np.unique(labels, return_counts=True)
    per_class = max(1, round(fraction * labels.size / classes.size))
    if counts.min() < per_class:
        short = classes[counts.argmin()]
        raise ValueError(f"few-label class {short} has {counts.min()} samples, fewer than the {per_class} needed")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picked))


def few_label_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    fraction: float,
    seed: int = 0,
    **probe_options,
) -> ProbeResult:
    """Linear probe trained on a seeded class-balanced fraction of the labelled train set (e.g. 0.01, 0.1)."""
    idx = few_label_subset(train_y, fraction, seed)
    train_y = np.asarray(train_y)
    probe_options.setdefault("num_classes", int(max(train_y.max(), np.asarray(test_y).max())) + 1)
    return linear_probe(np.asarray(train_x)[idx], train_y[idx], test_x, test_y, seed=seed, **probe_options)
