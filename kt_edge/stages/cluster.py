"""The cluster stage: faiss k-means on the teacher's features; pseudo-labels, centroids and a report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from kt_edge import atomic
from kt_edge.engine import distributed
from kt_edge.errors import DataError
from kt_edge.evaluate.clusters import cluster_report
from kt_edge.features import FeatureStore
from kt_edge.kmeans import fit_clusters, save_centroids
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir


def cluster_stage(recipe: Recipe, store: FeatureStore, assign_to: FeatureStore | None = None) -> Path:
    """k-means on the teacher's data.train features (``store``); pseudo-labels for data.train, or for
    cluster.assign_to (its features: ``assign_to``).

    Writes clusters/centroids.npy (+ sidecar), pseudo_labels.npy (int64, one per image in dataset order) and
    report.json.
    """
    run, cfg = RunDir(recipe.run_dir), recipe.cluster
    if cfg.k > store.n:
        raise DataError(f"cluster.k {cfg.k} is more than the {store.n} images of data.train; lower cluster.k")
    n_fit = min(store.n, cfg.k * cfg.max_points_per_centroid)  # the sample PCA and k-means are fitted on
    if cfg.pca_dim is not None and (cfg.pca_dim > store.dim or cfg.pca_dim >= n_fit):
        raise DataError(
            f"cluster.pca_dim {cfg.pca_dim} must be at most the feature dim {store.dim} and below "
            f"the {n_fit} points k-means is fitted on; lower it or unset it"
        )
    sets = {"data.train": store} | ({} if assign_to is None else {"cluster.assign_to": assign_to})
    # Every rank helps cluster (each its share of the sample); rank 0 alone assigns and writes.
    model, _ = fit_clusters(
        store,
        cfg.k,
        pca_dim=cfg.pca_dim,
        normalize=cfg.normalize,
        niter=cfg.niter,
        seed=recipe.seed,
        max_points_per_centroid=cfg.max_points_per_centroid,
        use_gpu=cfg.use_gpu,
        collective=True,
    )
    if not distributed.is_main():
        distributed.barrier()
        return run.clusters
    save_centroids(run.clusters / "centroids.npy", model)
    target = "data.train" if assign_to is None else "cluster.assign_to"
    reports, assigned = {}, {}
    for name, features in sets.items():
        assigned[name], _ = model.assign(features, use_gpu=cfg.use_gpu)
        reports[name] = cluster_report(assigned[name], features.labels, cfg.k)
    with atomic.atomic_path(run.pseudo_labels) as tmp, open(tmp, "wb") as fh:
        np.save(fh, assigned[target])
    atomic.write_json(
        run.clusters / "report.json", {"k": cfg.k, "pseudo_labels_of": target, "kmeans": model.meta, "sets": reports}
    )
    _print_cluster_table(reports)
    distributed.barrier()
    return run.clusters


def _print_cluster_table(reports: dict) -> None:
    table = Table(title="clusters (NMI / ARI / Hungarian accuracy against the true labels, where known)")
    table.add_column("images of", no_wrap=True)
    for column in ("n", "k", "empty", "sizes min/med/max", "NMI", "ARI", "accuracy"):
        table.add_column(column, justify="right")
    for name, r in reports.items():
        scores = [f"{r[key]:.3f}" if key in r else "-" for key in ("nmi", "ari", "hungarian_accuracy")]
        table.add_row(
            name,
            str(r["n"]),
            str(r["k"]),
            str(r["empty_clusters"]),
            f"{r['size_min']}/{r['size_median']:g}/{r['size_max']}",
            *scores,
        )
    Console().print(table)
