"""How clusters match classes: cluster alignment of features (k-means, then the matching) and the report
of a clustering (sizes, empty clusters, and against true labels where known).

Reported as Hungarian accuracy (best one-to-one cluster -> class matching),
NMI and ARI, the usual trio for self-supervised features.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from kt_edge.kmeans import Preprocessing, assign, fit_kmeans


def _check(pred: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.ndim != 1 or pred.shape != labels.shape or len(pred) == 0:
        raise ValueError(f"pred and labels must be equal-length non-empty 1-D arrays, got {pred.shape}, {labels.shape}")
    return pred, labels


def hungarian_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of points whose cluster maps to their class under the best one-to-one matching.

    With more clusters than classes the unmatched clusters count as wrong (and vice
    versa), so over-clustering is not rewarded.
    """
    pred, labels = _check(pred, labels)
    counts = contingency_matrix(labels, pred)  # [classes, clusters]
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(pred))


def nmi(pred: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean normalisation, sklearn's default)."""
    pred, labels = _check(pred, labels)
    return float(normalized_mutual_info_score(labels, pred))


def ari(pred: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted Rand index: 0 for chance, 1 for identical partitions."""
    pred, labels = _check(pred, labels)
    return float(adjusted_rand_score(labels, pred))


def cluster_alignment(
    features: np.ndarray,
    labels: np.ndarray,
    k: int | None = None,
    seed: int = 0,
    niter: int = 20,
    normalize: bool = True,
    restarts: int = 5,
) -> dict:
    """k-means (K = number of classes by default) on L2-normalised features, scored against labels >= 0.

    The best of ``restarts`` seeded k-means runs (lowest objective) is scored: one run's local optimum
    moves the accuracy by points between otherwise equal models.
    """
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features [N, D] and labels [N] must match, got {features.shape} and {labels.shape}")
    known = labels >= 0
    if not known.any():
        raise ValueError("cluster alignment needs labelled points (labels >= 0), got none")
    features, labels = features[known], labels[known]
    k = len(np.unique(labels)) if k is None else k
    prep = Preprocessing(normalize=normalize)
    x = prep(features)
    result = min((fit_kmeans(x, k, niter=niter, seed=seed + i) for i in range(restarts)), key=lambda r: r.objective)
    pred, _ = assign(x, result.centroids)
    return {
        "accuracy": hungarian_accuracy(pred, labels),
        "nmi": nmi(pred, labels),
        "ari": ari(pred, labels),
        "k": k,
        "n": int(len(labels)),
        "seed": seed,
        "restarts": restarts,
        "objective": result.objective,
    }


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
