"""The cluster stage: faiss k-means on the teacher's features; pseudo-labels, centroids and a report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from kt_edge import atomic
from kt_edge.data.sources import Images
from kt_edge.engine import distributed
from kt_edge.errors import DataError
from kt_edge.evaluate.clusters import cluster_report
from kt_edge.kmeans import fit_clusters, save_centroids
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages.features import features_stage
from kt_edge.stages.inputs import cluster_inputs, console, prepare, training_images
from kt_edge.transfer import DISTILLERS


def cluster_stage(recipe: Recipe) -> Path:
    """k-means on the teacher's data.train features; pseudo-labels for data.train, or for cluster.assign_to.

    Writes clusters/centroids.npy (+ sidecar), pseudo_labels.npy (int64, one per image in dataset
    order) and report.json last, which marks the stage complete.
    """
    out, inputs, cfg = prepare(recipe).clusters, cluster_inputs(recipe), recipe.cluster
    report_path = out / "report.json"
    done = (
        report_path.is_file()
        and json.loads(report_path.read_text()).get("inputs") == inputs
        and (out / "pseudo_labels.npy").is_file()
    )
    distributed.barrier()  # every rank has looked before rank 0 rewrites
    if done:
        if distributed.is_main():
            console.print(f"clusters: up to date in {out}")
        return out
    if distributed.is_main():
        report_path.unlink(missing_ok=True)  # it marks the stage complete: never beside a half-rewritten one
    store = features_stage(recipe, "train")
    if cfg.k > store.n:
        raise DataError(f"cluster.k {cfg.k} is more than the {store.n} images of data.train; lower cluster.k")
    n_fit = min(store.n, cfg.k * cfg.max_points_per_centroid)  # the sample PCA and k-means are fitted on
    if cfg.pca_dim is not None and (cfg.pca_dim > store.dim or cfg.pca_dim >= n_fit):
        raise DataError(
            f"cluster.pca_dim {cfg.pca_dim} must be at most the feature dim {store.dim} and below "
            f"the {n_fit} points k-means is fitted on; lower it or unset it"
        )
    sets = {"data.train": store}
    if cfg.assign_to is not None:
        sets["cluster.assign_to"] = features_stage(recipe, "assign_to")
    # Every rank helps extract and cluster (each its share of the sample); rank 0 alone assigns and writes.
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
        return out
    save_centroids(out / "centroids.npy", model)
    target = "cluster.assign_to" if cfg.assign_to is not None else "data.train"
    reports, assigned = {}, {}
    for name, features in sets.items():
        assigned[name], _ = model.assign(features, use_gpu=cfg.use_gpu)
        reports[name] = cluster_report(assigned[name], features.labels, cfg.k)
    with atomic.atomic_path(out / "pseudo_labels.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, assigned[target])
    atomic.write_json(
        report_path, {"inputs": inputs, "k": cfg.k, "pseudo_labels_of": target, "kmeans": model.meta, "sets": reports}
    )
    _print_cluster_table(reports)
    distributed.barrier()
    return out


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


def pseudo_labelled(recipe: Recipe) -> Images:
    """The cluster stage's pseudo-labels on the images they label (running features and cluster if needed)."""
    labels = np.load(cluster_stage(recipe) / "pseudo_labels.npy")
    images = training_images(recipe, recipe.cluster.assign_to)
    if len(labels) != len(images):
        raise DataError(
            f"{len(labels)} pseudo-labels for {len(images)} images of {images.name}: "
            f"delete {RunDir(recipe.run_dir).clusters} and run again"
        )
    return DISTILLERS[recipe.distill.method].training_set(images, labels, recipe.distill.options)
