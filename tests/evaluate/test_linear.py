"""Linear and few-label probes on data whose answer is known."""

import os
from pathlib import Path

import numpy as np
import pytest

from kt_edge.evaluate.knn import KnnSetting, knn_accuracy
from kt_edge.evaluate.linear import (
    compress_normalize,
    few_label_probe,
    few_label_subset,
    linear_probe,
    validation_split,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(rng, n, num_classes, dim, noise):
    centers = rng.normal(size=(num_classes, dim))
    y = rng.integers(0, num_classes, size=n)
    return (centers[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


def _half_space(rng, n, dim):
    """Label = sign of dim 0 (margin 0.5) among dim - 1 noise dims, a linearly separable set."""
    x = rng.normal(size=(n * 2, dim)).astype(np.float32)
    x = x[np.abs(x[:, 0]) > 0.5][:n]
    return x, (x[:, 0] > 0).astype(np.int64)


def test_linearly_separable_features_give_100_percent():
    rng = np.random.default_rng(0)
    x, y = _half_space(rng, 600, 128)
    result = linear_probe(x[:400], y[:400], x[:400], y[:400], weight_decay=0.0)
    assert result.top1 == 100.0
    held_out = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert held_out.top1 >= 97.0, held_out
    # The same task defeats cosine k-NN, so the probe is learning the direction, not echoing neighbours.
    knn = knn_accuracy(x[:400], y[:400], x[400:], y[400:], settings=(KnnSetting(20, 0.07),))[0]["top1"]
    assert knn < 90.0


def test_separated_clusters_give_100_percent_top1_and_top5():
    rng = np.random.default_rng(1)
    x, y = _clusters(rng, 700, 8, 16, noise=0.05)
    result = linear_probe(x[:500], y[:500], x[500:], y[500:])
    assert (result.top1, result.top5, result.num_train) == (100.0, 100.0, 500)


def test_random_labels_give_chance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=2000)
    result = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert 6.0 < result.top1 < 14.0, result
    assert 40.0 < result.top5 < 60.0, result


def test_top5_is_everything_with_at_most_five_classes():
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, 300, 3, 8, noise=3.0)
    result = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert result.top5 == 100.0 and result.top1 < 100.0


def test_weight_decay_is_selected_from_the_grid_on_held_out_data():
    rng = np.random.default_rng(4)
    # The label is in dim0 - dim1 under a large shared offset: strong decay shrinks towards the
    # class-mean direction, which the offset swamps; only weak decay finds the difference.
    n = 600
    y = rng.integers(0, 2, n)
    shared = 5.0 * rng.normal(size=n)
    x = np.stack(
        [shared + (2 * y - 1) * 0.5 + 0.05 * rng.normal(size=n), shared + 0.05 * rng.normal(size=n)]
        + [rng.normal(size=n) for _ in range(6)],
        axis=1,
    )
    strong = linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decay=10.0)
    chosen = linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decay=(10.0, 1e-4))
    assert strong.top1 < 70.0, strong
    assert chosen.weight_decay == 1e-4 and chosen.top1 > 97.0, chosen


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [10, 20, 5, 2, 1])
    fit, held = validation_split(labels, 0.2, seed=0)
    assert np.bincount(labels[held], minlength=5).tolist() == [2, 4, 1, 1, 0]
    assert set(labels[fit]) == set(range(5))
    assert np.array_equal(np.sort(np.concatenate([fit, held])), np.arange(labels.size))
    assert np.array_equal(held, validation_split(labels, 0.2, seed=0)[1])
    assert not np.array_equal(held, validation_split(labels, 0.2, seed=1)[1])


def test_one_sample_per_class_picks_the_strongest_decay():
    x = np.eye(4, 6, dtype=np.float32) + 0.1
    y = np.arange(4)
    result = linear_probe(x, y, x, y, weight_decay=(1e-3, 1.0, 1e-1))
    assert result.weight_decay == 1.0 and result.top1 == 100.0


def test_compress_normalization_uses_train_statistics_and_ignores_scale():
    rng = np.random.default_rng(5)
    train = rng.normal(loc=3.0, scale=[1.0, 10.0, 0.1], size=(500, 3))
    test = rng.normal(size=(7, 3))
    a, b = compress_normalize(train, test)
    np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(a.std(axis=0, ddof=1), 1.0, atol=1e-3)
    unit = train / np.linalg.norm(train, axis=1, keepdims=True)
    expected = (test / np.linalg.norm(test, axis=1, keepdims=True) - unit.mean(0)) / np.sqrt(unit.var(0, ddof=1) + 1e-5)
    np.testing.assert_allclose(b, expected, rtol=1e-4, atol=1e-5)
    a2, b2 = compress_normalize(train * 1000.0, test * 0.001)
    np.testing.assert_allclose(a2, a, atol=1e-4)
    np.testing.assert_allclose(b2, b, atol=1e-4)


def test_probe_is_deterministic():
    rng = np.random.default_rng(6)
    x, y = _clusters(rng, 600, 5, 24, noise=1.5)
    first = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert first == linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert few_label_probe(x[:400], y[:400], x[400:], y[400:], 0.1, seed=3) == few_label_probe(
        x[:400], y[:400], x[400:], y[400:], 0.1, seed=3
    )


def test_few_label_subset_is_class_balanced_and_seeded():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(10), rng.integers(90, 130, size=10))
    rng.shuffle(labels)
    idx = few_label_subset(labels, 0.1, seed=0)
    per_class = round(0.1 * labels.size / 10)
    assert np.bincount(labels[idx], minlength=10).tolist() == [per_class] * 10
    assert np.unique(idx).size == idx.size and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, few_label_subset(labels, 0.1, seed=0))
    assert not np.array_equal(idx, few_label_subset(labels, 0.1, seed=1))
    assert np.bincount(labels[few_label_subset(labels, 0.001, seed=0)]).tolist() == [1] * 10


def test_few_label_probe_trains_on_the_subset_only():
    rng = np.random.default_rng(8)
    x, y = _clusters(rng, 1200, 4, 16, noise=0.1)
    result = few_label_probe(x[:1000], y[:1000], x[1000:], y[1000:], fraction=0.01, seed=0)
    assert result.num_train == 4 * round(0.01 * 1000 / 4)
    assert result.top1 == 100.0


def test_clear_errors():
    x = np.zeros((20, 3), np.float32)
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match="fraction"):
        few_label_subset(y, 0.0, seed=0)
    with pytest.raises(ValueError, match="class 1 has 1 samples"):
        few_label_subset(np.array([0] * 50 + [1]), 0.5, seed=0)
    with pytest.raises(ValueError, match="dims differ"):
        linear_probe(x, y, np.zeros((2, 4)), y[:2])
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        linear_probe(x, y, x, y, weight_decay=-1.0)


def _shared_data() -> Path:
    repo_root = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("KT_EDGE_SHARED_DATA", repo_root.parent / "shared" / "data"))


def test_raw_pixel_probes_on_cifar10_beat_chance():
    from PIL import Image

    root = _shared_data() / "cifar10"
    if not root.is_dir():
        pytest.skip(f"shared CIFAR-10 data not found at {root} (set KT_EDGE_SHARED_DATA)")
    rng = np.random.default_rng(0)

    def load(split, per_class):
        xs, ys = [], []
        for label, class_dir in enumerate(sorted(p for p in (root / split).iterdir() if p.is_dir())):
            files = sorted(class_dir.glob("*.jpg"))
            for i in rng.choice(len(files), per_class, replace=False):
                with Image.open(files[i]) as im:  # 4x4-average-pooled pixels keep the probe fast
                    xs.append(np.asarray(im.convert("RGB").reduce(4), np.float32).ravel() / 255.0)
                ys.append(label)
        return np.stack(xs), np.array(ys)

    train_x, train_y = load("train", 60)
    test_x, test_y = load("test", 20)
    full = linear_probe(train_x, train_y, test_x, test_y)
    few = few_label_probe(train_x, train_y, test_x, test_y, 0.1)
    assert full.top1 > 20.0, full
    assert full.top5 > 60.0, full
    assert few.top1 > 12.0, few
