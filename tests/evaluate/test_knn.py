"""k-NN protocol on data whose answer is known, plus a real-image sanity check."""

import os
from pathlib import Path

import numpy as np
import pytest

from kt_edge.evaluate import knn
from kt_edge.evaluate.knn import DEFAULT_SETTINGS, KnnSetting, knn_accuracy, knn_classify, weighted_vote


def _unit(angle_cos: float) -> list[float]:
    """2-D unit vector whose cosine with [1, 0] is angle_cos."""
    return [angle_cos, float(np.sqrt(1.0 - angle_cos**2))]


def _clusters(rng, n_per_class, num_classes, dim, noise):
    centers = rng.normal(size=(num_classes, dim)) * 5.0
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = centers[y] + noise * rng.normal(size=(y.size, dim))
    perm = rng.permutation(y.size)
    return x[perm].astype(np.float32), y[perm]


def test_weighted_vote_by_hand():
    # One test row, neighbours sorted: class 0 at 0.95, class 1 at 0.80 and 0.78.
    sims = np.array([[0.95, 0.80, 0.78]])
    labels = np.array([[0, 1, 1]])
    # t=0.07: e^(0.95/0.07) = 7.8e5 beats e^(0.80/0.07) + e^(0.78/0.07) = 1.6e5.
    assert weighted_vote(sims, labels, KnnSetting(3, 0.07), 2).tolist() == [0]
    # t=1: e^0.95 = 2.59 loses to e^0.80 + e^0.78 = 4.41.
    assert weighted_vote(sims, labels, KnnSetting(3, 1.0), 2).tolist() == [1]
    # k=1 only sees the top neighbour.
    assert weighted_vote(sims, labels, KnnSetting(1, 1.0), 2).tolist() == [0]


def test_knn_classify_by_hand_from_raw_vectors():
    # Unnormalised train vectors: scaling must not matter (cosine on L2-normalised features).
    train_x = np.array([_unit(0.95), _unit(0.80), _unit(0.78), _unit(-0.5)]) * np.array([[3.0], [0.5], [7.0], [2.0]])
    train_y = np.array([0, 1, 1, 0])
    test_x = np.array([[10.0, 0.0]])
    settings = (KnnSetting(3, 0.07), KnnSetting(3, 1.0), KnnSetting(4, 1.0))
    preds = knn_classify(train_x, train_y, test_x, settings)
    # k=4, t=1: class 0 gets e^0.95 + e^-0.5 = 3.19 < class 1's 4.41.
    assert [int(preds[s][0]) for s in settings] == [0, 1, 1]


def test_large_temperature_ratio_stays_finite():
    sims = np.array([[1.0, 0.99, -1.0]])
    labels = np.array([[1, 0, 0]])
    # exp(1 / 0.001) overflows float64 unless shifted; the top neighbour must still win.
    assert weighted_vote(sims, labels, KnnSetting(3, 0.001), 2).tolist() == [1]


def test_separated_clusters_give_100_percent():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 60, 5, 32, noise=0.5)
    results = knn_accuracy(x[:200], y[:200], x[200:], y[200:], settings=(KnnSetting(20, 0.07), KnnSetting(1, 0.07)))
    assert [r["top1"] for r in results] == [100.0, 100.0]
    assert results[0] == {"k": 20, "t": 0.07, "top1": 100.0}


def test_random_labels_give_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=3000)
    for r in knn_accuracy(x[:2000], y[:2000], x[2000:], y[2000:]):
        assert 5.0 < r["top1"] < 15.0, r


def test_multi_setting_single_pass_equals_separate_calls():
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 80, 4, 16, noise=6.0)  # overlapping, so settings disagree
    together = knn_classify(x[:250], y[:250], x[250:], DEFAULT_SETTINGS)
    for s in DEFAULT_SETTINGS:
        np.testing.assert_array_equal(together[s], knn_classify(x[:250], y[:250], x[250:], (s,))[s])
    assert not np.array_equal(together[DEFAULT_SETTINGS[0]], together[DEFAULT_SETTINGS[2]])


def test_faiss_search_matches_torch_search(monkeypatch):
    rng = np.random.default_rng(3)
    x, y = _clusters(rng, 100, 5, 24, noise=5.0)
    via_torch = knn_classify(x[:400], y[:400], x[400:], batch_size=37)
    monkeypatch.setattr(knn, "FAISS_MIN_PAIRS", 0)
    via_faiss = knn_classify(x[:400], y[:400], x[400:])
    for s in DEFAULT_SETTINGS:
        np.testing.assert_array_equal(via_torch[s], via_faiss[s])
    sims_t, _ = knn.nearest_neighbors(x[:400], x[400:], 5)
    monkeypatch.setattr(knn, "FAISS_MIN_PAIRS", 10**12)
    sims_f, _ = knn.nearest_neighbors(x[:400], x[400:], 5)
    np.testing.assert_allclose(sims_t, sims_f, atol=1e-5)


def test_clear_errors():
    x = np.zeros((10, 4), np.float32)
    y = np.zeros(10, np.int64)
    with pytest.raises(ValueError, match="k=200 exceeds the 10"):
        knn_classify(x, y, x)
    with pytest.raises(ValueError, match="dims differ"):
        knn_classify(x, y, np.zeros((3, 5)), (KnnSetting(1, 0.1),))
    with pytest.raises(ValueError, match="labels shape"):
        knn_classify(x, y[:5], x, (KnnSetting(1, 0.1),))
    with pytest.raises(ValueError, match="temperature"):
        KnnSetting(5, 0.0)


def test_setting_name():
    assert [s.name for s in DEFAULT_SETTINGS] == ["knn_k200_t0.1", "knn_k20_t0.07", "knn_k1_t0.07"]


def _shared_data() -> Path:
    repo_root = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("KT_EDGE_SHARED_DATA", repo_root.parent / "shared" / "data"))


def _load_pixels(split_dir: Path, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattened RGB pixels of a seeded per-class sample of an ImageFolder split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for label, class_dir in enumerate(sorted(p for p in split_dir.iterdir() if p.is_dir())):
        files = sorted(class_dir.glob("*.jpg"))
        for i in rng.choice(len(files), per_class, replace=False):
            with Image.open(files[i]) as im:
                xs.append(np.asarray(im.convert("RGB"), np.float32).ravel() / 255.0)
            ys.append(label)
    return np.stack(xs), np.array(ys)


def test_raw_pixel_knn_on_cifar10_beats_chance():
    root = _shared_data() / "cifar10"
    if not root.is_dir():
        pytest.skip(f"shared CIFAR-10 data not found at {root} (set KT_EDGE_SHARED_DATA)")
    train_x, train_y = _load_pixels(root / "train", 50, seed=0)
    test_x, test_y = _load_pixels(root / "test", 20, seed=0)
    # Centre the pixels so cosine similarity is not dominated by brightness.
    mean = train_x.mean(axis=0)
    results = knn_accuracy(train_x - mean, train_y, test_x - mean, test_y, settings=(KnnSetting(20, 0.07),))
    assert results[0]["top1"] > 18.0, results
