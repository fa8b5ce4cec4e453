"""faiss k-means uses every GPU faiss sees, and says once, plainly, when it falls back to the CPU."""

import logging

import faiss
import numpy as np
import pytest
import torch

from kt_edge import kmeans as cluster
from kt_edge.kmeans import fit_kmeans


def _points():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(400, 8)) + np.repeat(np.eye(8)[:4] * 6, 100, axis=0)).astype(np.float32)


@pytest.mark.skipif(faiss.get_num_gpus() > 0 or torch.cuda.is_available(), reason="a GPU here: no fallback to check")
def test_without_a_gpu_kmeans_runs_on_the_cpu_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr(cluster, "_cpu_fallback_reported", False)
    with caplog.at_level(logging.WARNING, logger=cluster.log.name):
        first = fit_kmeans(_points(), 4, niter=5, use_gpu="auto")
        fit_kmeans(_points(), 4, niter=5, use_gpu="auto")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"no GPU for k-means (faiss-cpu build, no CUDA device): faiss runs on the CPU, {cluster.cores()} threads"
    ]
    assert first.engine == "faiss-cpu" and first.centroids.shape == (4, 8)


@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="faiss sees no GPU (faiss-cpu build or no CUDA device)")
def test_kmeans_uses_all_gpus_faiss_sees():
    result = fit_kmeans(_points(), 4, niter=5, use_gpu="auto")
    assert result.engine == "faiss-gpu"
    cpu = fit_kmeans(_points(), 4, niter=5, use_gpu=False)
    assert abs(result.objective - cpu.objective) / cpu.objective < 0.05
