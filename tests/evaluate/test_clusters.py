"""Cluster-alignment metrics: Hungarian accuracy, NMI, ARI and the k-means alignment score."""

import numpy as np
import pytest

from kt_edge.evaluate.clusters import ari, cluster_alignment, hungarian_accuracy, nmi


def test_permuted_perfect_clustering_scores_one():
    labels = np.repeat(np.arange(5), 20)
    pred = np.array([3, 0, 4, 1, 2])[labels]
    assert hungarian_accuracy(pred, labels) == 1.0
    assert nmi(pred, labels) == pytest.approx(1.0)
    assert ari(pred, labels) == pytest.approx(1.0)


def test_hungarian_is_one_to_one_when_cluster_count_differs():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # over-clustering: class 0 split in two clusters; only one of them can be matched
    assert hungarian_accuracy(np.array([0, 0, 1, 1, 2, 2, 2, 2]), labels) == pytest.approx(6 / 8)
    # under-clustering: everything in one cluster matches one class
    assert hungarian_accuracy(np.zeros(8, dtype=int), labels) == pytest.approx(0.5)
    # cluster ids need not be contiguous or start at 0
    assert hungarian_accuracy(np.array([7, 7, 7, 7, 42, 42, 42, 42]), labels) == 1.0


def test_random_clustering_scores_near_chance():
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 10, 5000), rng.integers(0, 10, 5000)
    assert abs(ari(pred, labels)) < 0.01 and nmi(pred, labels) < 0.01
    assert hungarian_accuracy(pred, labels) < 0.15


def test_cluster_alignment_on_separable_features():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((4, 32)) * 5
    labels = np.repeat(np.arange(4), 150)
    feats = (centers[labels] + rng.standard_normal((600, 32))).astype(np.float32)
    labels_with_unknown = labels.copy()
    labels_with_unknown[:10] = -1
    out = cluster_alignment(feats, labels_with_unknown, seed=0)
    assert out["k"] == 4 and out["n"] == 590
    assert out["accuracy"] > 0.99 and out["nmi"] > 0.95 and out["ari"] > 0.95
    noise = cluster_alignment(rng.standard_normal((600, 32)).astype(np.float32), labels, seed=0)
    assert noise["ari"] < 0.05


def test_metric_input_errors():
    with pytest.raises(ValueError, match="equal-length"):
        nmi(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="labelled"):
        cluster_alignment(np.zeros((5, 2), np.float32), -np.ones(5, int))


def test_restarts_keep_the_lowest_objective_run():
    rng = np.random.default_rng(0)
    centres = rng.uniform(-10, 10, size=(10, 2))
    labels = np.repeat(np.arange(10), 40)
    feats = (centres[labels] + rng.normal(scale=0.6, size=(400, 2))).astype(np.float32)
    single = [cluster_alignment(feats, labels, seed=s, restarts=1, normalize=False) for s in range(5)]
    best = [cluster_alignment(feats, labels, seed=s, restarts=5, normalize=False) for s in range(5)]
    assert all(b["objective"] <= s["objective"] + 1e-3 for b, s in zip(best, single))
    assert any(b["objective"] < s["objective"] - 1e-3 for b, s in zip(best, single))
