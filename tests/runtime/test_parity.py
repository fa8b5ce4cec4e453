"""Golden parity, weighted k-NN and accuracy parity on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kt_edge_runtime.parity import (
    DEFAULT_THRESHOLDS,
    Thresholds,
    accuracy_parity,
    golden_parity,
    knn_top1,
)


def embeddings(n=16, d=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_defaults_are_the_documented_thresholds():
    assert DEFAULT_THRESHOLDS["fp32"] == Thresholds(min_cosine=0.99999, rtol=1e-3, atol=1e-5, max_top1_drop=1.0)
    assert DEFAULT_THRESHOLDS["fp16"] == Thresholds(min_cosine=0.997, max_top1_drop=1.0)
    assert DEFAULT_THRESHOLDS["int8"] == Thresholds(min_cosine=0.98, max_top1_drop=1.0)


def test_identical_outputs_pass_every_precision():
    ref = embeddings()
    for precision in ("fp32", "fp16", "int8"):
        report = golden_parity(ref, ref.copy(), precision)
        assert report.passed and report.max_abs_err == 0 and report.min_cosine == pytest.approx(1.0)


def test_fp32_fails_allclose_and_names_the_worst_sample():
    ref = embeddings()
    cand = ref.copy()
    cand[3, 5] += 1e-2  # far outside rtol/atol
    cand[11] *= 1.0005  # within rtol: not the worst
    report = golden_parity(ref, cand, "fp32")
    assert not report.passed
    assert report.worst_sample == 3
    assert report.worst_abs_err == pytest.approx(1e-2, rel=1e-3)
    assert "worst sample 3" in report.summary() and "FAIL" in report.summary()
    assert any("outside rtol" in f for f in report.failures)


def test_fp32_within_tolerance_passes():
    ref = embeddings()
    cand = ref * (1 + 5e-4) + 5e-6
    assert golden_parity(ref, cand, "fp32").passed


def test_cosine_decides_reduced_precisions():
    ref = embeddings(d=64)
    noise = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
    small = ref + 0.03 * noise  # cosine about 0.9995
    large = ref.copy()
    large[7] += 0.5 * noise[7]  # one sample at cosine about 0.9
    assert golden_parity(ref, small, "fp16").passed
    assert not golden_parity(ref, small, "fp32").passed
    report = golden_parity(ref, large, "int8")
    assert not report.passed and report.worst_sample == 7
    assert report.min_cosine == pytest.approx(report.worst_cosine) and report.min_cosine < 0.98


def test_custom_thresholds_apply():
    ref = embeddings()
    cand = ref + 0.3 * embeddings(seed=2)  # cosine about 0.96
    assert not golden_parity(ref, cand, "int8").passed
    assert golden_parity(ref, cand, "int8", Thresholds(min_cosine=0.9)).passed


def test_non_finite_candidate_fails():
    ref = embeddings()
    cand = ref.copy()
    cand[4, 0] = np.nan
    report = golden_parity(ref, cand, "fp16")
    assert not report.passed and report.worst_sample == 4
    assert "non-finite" in report.summary()


def test_shape_mismatch_and_unknown_precision_are_errors():
    with pytest.raises(ValueError, match="does not match"):
        golden_parity(embeddings(), embeddings()[:, :8], "fp32")
    with pytest.raises(ValueError, match="unknown precision 'bf16'"):
        golden_parity(embeddings(), embeddings(), "bf16")


def test_report_serialises():
    report = golden_parity(embeddings(), embeddings(), "int8")
    data = report.to_dict()
    assert data["precision"] == "int8" and data["thresholds"] == {"min_cosine": 0.98, "max_top1_drop": 1.0}
    assert isinstance(data["failures"], list)


def clusters(n_per_class: int, classes: int, d: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)) * 5
    y = np.repeat(np.arange(classes), n_per_class)
    return (centres[y] + spread * rng.standard_normal((len(y), d))).astype(np.float32), y


def test_knn_separable_clusters_is_perfect():
    train_x, train_y = clusters(50, 5, 16, 0.1, seed=0)
    test_x, test_y = clusters(20, 5, 16, 0.1, seed=0)
    assert knn_top1(train_x, train_y, test_x, test_y, k=20, t=0.07) == 100.0


def test_knn_random_labels_is_near_chance():
    train_x, _ = clusters(100, 4, 8, 3.0, seed=1)
    rng = np.random.default_rng(2)
    test_x = rng.standard_normal((400, 8)).astype(np.float32)
    acc = knn_top1(train_x, rng.integers(0, 4, len(train_x)), test_x, rng.integers(0, 4, 400), k=20)
    assert 15.0 < acc < 35.0


def reference_knn(train_x, train_y, test_x, test_y, k, t):
    """Straightforward per-sample loop: the definition knn_top1 must match."""
    bank = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    correct = 0
    for x, y in zip(test_x, test_y, strict=True):
        sim = bank @ (x / np.linalg.norm(x))
        idx = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(train_y.max() + 1)
        for i in idx:
            votes[train_y[i]] += np.exp(sim[i] / t)
        correct += votes.argmax() == y
    return 100.0 * correct / len(test_x)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 40),
    t=st.sampled_from([0.07, 0.1, 0.5]),
    batch=st.integers(1, 64),
)
def test_knn_matches_reference_for_any_batching(seed, k, t, batch):
    train_x, train_y = clusters(10, 3, 6, 2.0, seed)
    test_x, test_y = clusters(8, 3, 6, 2.0, seed + 1)
    expected = reference_knn(train_x, train_y, test_x, test_y, min(k, len(train_x)), t)
    assert knn_top1(train_x, train_y, test_x, test_y, k=k, t=t, batch_size=batch) == pytest.approx(expected)


def test_knn_rejects_bad_input():
    x, y = clusters(5, 2, 4, 0.1, 0)
    with pytest.raises(ValueError, match="equal D"):
        knn_top1(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="one label per row"):
        knn_top1(x, y[:-1], x, y)


def test_accuracy_parity():
    assert accuracy_parity(80.0, 79.2).passed
    assert accuracy_parity(80.0, 81.0).passed  # better than the reference is fine
    failed = accuracy_parity(80.0, 78.5)
    assert not failed.passed and failed.drop == pytest.approx(1.5)
    assert "FAIL" in failed.summary() and "78.50" in failed.summary()
    assert accuracy_parity(80.0, 78.5, max_drop=2.0).passed
    with pytest.raises(ValueError, match="candidate_top1"):
        accuracy_parity(80.0, 0.79 * 100 + 100)
