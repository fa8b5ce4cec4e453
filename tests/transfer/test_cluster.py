"""faiss clustering: PCA-whitening, k-means, streamed assignment, saved centroids, cluster report."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset
from transfer_kit import read_centroids

from kt_edge.evaluate.clusters import cluster_report
from kt_edge.features import extract
from kt_edge.kmeans import (
    ClusterModel,
    PCAWhitening,
    Preprocessing,
    assign,
    engine,
    first_centroids,
    fit_clusters,
    fit_kmeans,
    l2_normalize,
    sample_rows,
    save_centroids,
)


def blobs(n_per=200, k=6, dim=16, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)) * 3
    labels = np.repeat(np.arange(k), n_per)
    x = centers[labels] + spread * rng.standard_normal((len(labels), dim))
    return x.astype(np.float32), labels


def store_of(x, labels, root, shard_size=250):
    """Put an array into a FeatureStore through the real extractor (identity model)."""
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(labels))
    return extract(torch.nn.Identity(), ds, root, batch_size=128, shard_size=shard_size, progress=False)


def ari(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b)


def test_kmeans_recovers_separable_blobs():
    x, labels = blobs()
    result = fit_kmeans(x, 6, niter=20, seed=0, use_gpu=False)
    assert result.centroids.shape == (6, 16) and result.centroids.dtype == np.float32
    assert result.n_train == len(x) and result.engine == "faiss-cpu"
    assert 1 <= len(result.objective_history) <= 20
    assert result.objective == result.objective_history[-1] == min(result.objective_history)
    pred, dist = assign(x, result.centroids)
    assert ari(pred, labels) > 0.95
    np.testing.assert_allclose(dist, ((x - result.centroids[pred]) ** 2).sum(1), rtol=1e-4, atol=1e-4)


def test_kmeans_samples_at_most_k_times_max_points_and_is_seeded():
    x, _ = blobs(n_per=500)
    a, result = fit_clusters(x, 6, max_points_per_centroid=50, seed=3, use_gpu=False)
    b, _ = fit_clusters(x, 6, max_points_per_centroid=50, seed=3, use_gpu=False)
    assert result.n_train == 300
    np.testing.assert_array_equal(a.centroids, b.centroids)
    with pytest.raises(ValueError, match="k must be"):
        fit_kmeans(x[:5], 6, use_gpu=False)


@pytest.mark.parametrize("spread", [0.3, 2.0])
def test_the_torch_engine_runs_faiss_iterations(spread):
    """From the same first centroids, torch's Lloyd iterations are faiss's: the same objective at every
    iteration it runs, and the same centroids (separable and overlapping blobs)."""
    import faiss

    x, labels = blobs(n_per=300, k=8, dim=32, spread=spread)
    ours = fit_kmeans(x, 8, niter=20, seed=0, engine_name="torch")
    theirs = faiss.Kmeans(32, 8, niter=20, max_points_per_centroid=len(x))
    theirs.train(x, init_centroids=x[first_centroids(len(x), 8, 0)])
    assert ours.engine == "torch" and len(ours.objective_history) == 20
    ran = len(theirs.obj)  # faiss stops once its objective no longer changes
    np.testing.assert_allclose(ours.objective_history[:ran], theirs.obj, rtol=1e-4)
    np.testing.assert_allclose(ours.centroids, theirs.centroids, rtol=1e-4, atol=1e-4)


def test_the_torch_engine_refills_an_empty_cluster_by_splitting_a_large_one():
    """Two far clusters and a third centroid that starts on a duplicate point: faiss's split keeps k full."""
    x = np.concatenate([np.zeros((50, 4)), np.full((50, 4), 10.0), np.full((1, 4), 10.0)]).astype(np.float32)
    x += np.random.default_rng(0).normal(0, 0.01, x.shape).astype(np.float32)
    result = fit_kmeans(x, 4, niter=10, seed=1, engine_name="torch")
    labels, _ = assign(x, result.centroids)
    assert len(np.unique(labels)) == 4 and np.isfinite(result.centroids).all()


def test_pca_whitening_gives_identity_covariance():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((32, 32)) * np.geomspace(10, 0.1, 32)
    x = (rng.standard_normal((20000, 32)) @ mix + 5).astype(np.float32)
    pca = PCAWhitening.fit(x, 8, max_samples=10000, seed=0)
    assert (pca.d_in, pca.d_out) == (32, 8)
    y = pca.apply(x, batch_size=3000)
    np.testing.assert_allclose(np.cov(y.T), np.eye(8), atol=0.05)
    np.testing.assert_allclose(y.mean(0), 0, atol=0.05)
    with pytest.raises(ValueError, match="dim"):
        pca.apply(x[:, :16])


def test_l2_normalize_in_batches():
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    x[3] = 0
    y = l2_normalize(x, batch_size=128)
    norms = np.linalg.norm(y, axis=1)
    assert np.allclose(np.delete(norms, 3), 1, atol=1e-6) and norms[3] == 0
    assert np.abs(x[0]).sum() != 1 and not np.shares_memory(x, y)


def test_sample_rows_from_store_matches_array(tmp_path):
    x, labels = blobs(n_per=100)
    store = store_of(x, labels, tmp_path)
    a = sample_rows(store, 137, seed=5)
    b = sample_rows(x.astype(np.float16).astype(np.float32), 137, seed=5)
    np.testing.assert_array_equal(a, b)
    assert len(sample_rows(store, 10**6)) == store.n


def test_streamed_assignment_from_store_matches_in_memory(tmp_path):
    x, labels = blobs(n_per=150)
    store = store_of(x, labels, tmp_path)
    x16 = store.to_array()
    result = fit_kmeans(x16, 6, seed=0, use_gpu=False)
    in_mem, d_mem = assign(x16, result.centroids, batch_size=10**6)
    streamed, d_str = assign(store, result.centroids, batch_size=64)
    np.testing.assert_array_equal(in_mem, streamed)
    np.testing.assert_allclose(d_mem, d_str, rtol=1e-5)


def test_saved_centroids_assign_a_second_dataset_with_same_preprocessing(tmp_path):
    x, labels = blobs(n_per=300, dim=24, seed=1)
    model, result = fit_clusters(x, 6, pca_dim=12, normalize=True, seed=0, use_gpu=False)
    assert model.centroids.shape == (6, 12) and model.meta["n_train"] == result.n_train
    path = save_centroids(tmp_path / "clusters" / "centroids", model)
    doc = json.loads(path.with_suffix(".json").read_text())
    assert doc["k"] == 6 and doc["dim"] == 12
    assert doc["preprocess"]["pca"]["d_in"] == 24 and doc["preprocess"]["l2_normalize"] is True
    loaded = read_centroids(path)
    np.testing.assert_array_equal(loaded.centroids, model.centroids)
    np.testing.assert_array_equal(loaded.preprocess.pca.A, model.preprocess.pca.A)

    # a different dataset drawn around the same centres, stored on disk and assigned in batches
    rng = np.random.default_rng(7)
    centres = np.stack([x[labels == c].mean(0) for c in range(6)])
    other_labels = rng.integers(0, 6, 500)
    other = (centres[other_labels] + 0.3 * rng.standard_normal((500, 24))).astype(np.float32)
    store = store_of(other, other_labels, tmp_path / "other", shard_size=128)
    pred, _ = loaded.assign(store)
    assert ari(pred, other_labels) > 0.95
    direct, _ = assign(other, model.centroids, preprocess=model.preprocess)
    assert ari(pred, direct) > 0.99  # fp16 storage may move a border point at most
    # without the saved preprocessing the dims do not even match
    with pytest.raises(ValueError, match="dim"):
        assign(other, loaded.centroids)


def test_the_sidecar_is_written_last_and_an_old_one_is_gone_before_a_rewrite(tmp_path, monkeypatch):
    """The sidecar marks the saved centroids complete: a save cut short leaves none (not the previous one)."""
    import kt_edge.kmeans as kmeans

    model = ClusterModel(np.eye(3, dtype=np.float32), Preprocessing(normalize=False))
    path = save_centroids(tmp_path / "c.npy", model)
    assert read_centroids(path).preprocess.pca is None

    def cut_short(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(kmeans, "write_json", cut_short)
    with pytest.raises(OSError):
        save_centroids(tmp_path / "c.npy", model)
    assert not path.with_suffix(".json").exists()


def test_cluster_report_sizes_and_label_metrics():
    labels = np.repeat(np.arange(3), 10)
    pred = np.array([2, 0, 1])[labels]
    rep = cluster_report(pred, labels, k=5)
    assert rep["k"] == 5 and rep["empty_clusters"] == 2 and rep["size_max"] == 10 and rep["size_min"] == 0
    assert sum(rep["size_histogram"]["counts"]) == 3
    assert rep["hungarian_accuracy"] == 1.0 and rep["nmi"] == pytest.approx(1) and rep["ari"] == pytest.approx(1)
    unlabelled = cluster_report(pred, -np.ones(30, dtype=int))
    assert "nmi" not in unlabelled and unlabelled["k"] == 3
    partly = labels.copy()
    partly[:5] = -1
    assert cluster_report(pred, partly)["labelled"] == 25
    with pytest.raises(ValueError, match="0..1"):
        cluster_report(pred, k=2)


def test_engine_selection_on_this_machine():
    import faiss

    assert engine(False) == "faiss-cpu"
    if faiss.get_num_gpus() > 0:
        assert engine("auto") == engine(True) == "faiss-gpu"
    elif torch.cuda.is_available():
        assert engine("auto") == engine(True) == "torch"
    else:
        assert engine("auto") == "faiss-cpu"
        with pytest.raises(RuntimeError, match="GPU"):
            engine(True)
