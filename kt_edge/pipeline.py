"""The stages of a run, each reading the previous stage's artifact from the run directory.

``runs/<name>/``: ``recipe.yaml`` (resolved), ``metrics.jsonl``, ``teacher/``, ``features/<split>/``
(teacher features, fp16 shards), ``clusters/`` (centroids, pseudo-labels, report), ``student/``
(safetensors + JSON sidecar, ``resume.pt``), ``eval/results.json``, ``bundle/``.  A stage whose
output exists for the same inputs is skipped; a partial one is redone, or resumed with ``resume``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kt_edge import atomic
from kt_edge.data.augment import eval_transform
from kt_edge.data.cache import cached_source
from kt_edge.data.feed import resolve_augment
from kt_edge.data.sources import Images, open_source
from kt_edge.engine import distributed
from kt_edge.engine.device import resolve_device
from kt_edge.engine.trainer import train
from kt_edge.errors import CheckpointError, DataError
from kt_edge.features import FeatureStore, extract
from kt_edge.models.backbones import at_layer, build_backbone
from kt_edge.models.checkpoint import load_backbone, read_sidecar, save_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.models.importers import import_teacher
from kt_edge.recipe import Recipe
from kt_edge.teachers import TEACHERS
from kt_edge.transfer import DISTILLERS
from kt_edge.transfer.cached_teacher import CachedTeacher
from kt_edge.transfer.cluster import cluster_report, fit_clusters, save_centroids

console = Console(stderr=True)


def prepare(recipe: Recipe) -> Path:
    """Join torchrun's process group if there is one; create the run directory and record the resolved recipe."""
    distributed.init_from_env(recipe.device)
    run_dir = recipe.run_dir
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(run_dir / "recipe.yaml", recipe.to_yaml())
    return run_dir


def training_images(recipe: Recipe, source=None) -> Images:
    """A training split (data.train by default): its uint8 cache when data.cache is set, else the files."""
    source = source or recipe.data.train
    if recipe.data.cache:
        return cached_source(source, recipe.data.image_size, recipe.seed, recipe.data.cache_dir,
                             workers=recipe.data.workers)
    return open_source(source, recipe.seed)


def cache_data(recipe: Recipe, split: str = "train") -> Path:
    """Decode data.<split> once into the uint8 cache that training reads with data.cache: true."""
    source = {"train": recipe.data.train, "test": recipe.data.test}.get(split)
    if source is None:
        raise DataError(f"no data.{split} in the recipe" if split in ("train", "test")
                        else f"unknown split {split!r}; choose train or test")
    images = cached_source(source, recipe.data.image_size, recipe.seed, recipe.data.cache_dir,
                           workers=recipe.data.workers)
    console.print(f"cache: {len(images)} images of data.{split} at {recipe.data.image_size}px in {images.root}")
    return images.root


def _up_to_date(folder: Path, inputs: str) -> bool:
    card = read_sidecar(folder)
    return card is not None and card.get("inputs") == inputs


def teacher_inputs(recipe: Recipe) -> str:
    return recipe.digest("seed", "data.train", "data.image_size", "teacher")


def student_inputs(recipe: Recipe) -> str:
    keys = ["seed", "data.train", "data.image_size", "teacher", "distill"]
    if distill_needs(recipe) == "pseudo_labels":
        keys.append("cluster")
    return recipe.digest(*keys)


def distill_needs(recipe: Recipe) -> str | None:
    """What distill.method needs first: "pseudo_labels" (cluster stage), "cached_features" (features) or None."""
    method = DISTILLERS[recipe.distill.method]
    return method.needs(recipe.distill.options) if hasattr(method, "needs") else None


def train_teacher(recipe: Recipe, resume: bool = False) -> Path:
    out = prepare(recipe) / "teacher"
    inputs = teacher_inputs(recipe)
    if _up_to_date(out, inputs):
        console.print(f"teacher: up to date in {out}")
        return out
    cfg = recipe.teacher
    if cfg.checkpoint is not None:
        backbone = import_teacher(cfg.checkpoint, cfg.arch, recipe.data.image_size, cfg.format, cfg.layer)
        save_backbone(backbone, out, stage="teacher", method="imported", source=str(cfg.checkpoint), inputs=inputs)
        console.print(f"teacher: imported {cfg.checkpoint} -> {out}")
        return out
    data = training_images(recipe)
    torch.manual_seed(recipe.seed)
    backbone = build_backbone(cfg.arch, recipe.data.image_size)
    method = TEACHERS[cfg.method](backbone, cfg.options, n_images=len(data))
    result = _train(recipe, method, data, cfg.train, out, "teacher", resume, inputs)
    if distributed.is_main():
        backbone = at_layer(method.backbone, cfg.layer) if cfg.layer else method.backbone
        save_backbone(backbone, out, stage="teacher", method=cfg.method, inputs=inputs,
                      steps=result.steps, final_loss=result.final_loss)
    distributed.barrier()
    return out


def distill(recipe: Recipe, resume: bool = False) -> Path:
    run_dir = prepare(recipe)
    out = run_dir / "student"
    inputs = student_inputs(recipe)
    if _up_to_date(out, inputs):
        console.print(f"student: up to date in {out}")
        return out
    teacher_dir = run_dir / "teacher"
    if not _up_to_date(teacher_dir, teacher_inputs(recipe)):
        raise CheckpointError(f"no teacher for this recipe in {teacher_dir}: run `kt-edge train-teacher` first")
    device = resolve_device(recipe.device)
    cfg = recipe.distill
    needs, extra = distill_needs(recipe), {}
    if needs == "pseudo_labels":  # the teacher speaks through the labels; it is not run while training
        data, teacher, extra["n_classes"] = _pseudo_labelled(recipe), None, recipe.cluster.k
    elif needs == "cached_features":
        data = training_images(recipe)
        teacher = CachedTeacher(features_stage(recipe, "train"), device)
        if len(teacher) != len(data):
            raise DataError(f"{len(teacher)} cached teacher features for {len(data)} images of data.train: "
                            f"delete {run_dir / 'features' / 'train'} and run again")
        data = data.with_labels(np.arange(len(data)))
    else:
        data = training_images(recipe)
        teacher = FrozenTeacher(load_backbone(teacher_dir)[0], device)
    torch.manual_seed(recipe.seed)
    student = build_backbone(cfg.student, recipe.data.image_size)
    method = DISTILLERS[cfg.method](student, teacher, cfg.options, n_images=len(data), **extra)
    result = _train(recipe, method, data, cfg.train, out, "distill", resume, inputs)
    if distributed.is_main():
        save_backbone(method.backbone, out, stage="student", method=cfg.method, teacher=str(teacher_dir),
                      inputs=inputs, steps=result.steps, final_loss=result.final_loss)
    distributed.barrier()
    return out


def _train(recipe, method, data, cfg, out, stage, resume, inputs):
    device = resolve_device(recipe.device)
    augment = resolve_augment(recipe.data.augment, data, recipe.data.image_size, device,
                              method.train_transform(recipe.data.image_size))
    path = ("cache+" if recipe.data.cache else "") + augment
    return train(method, data, cfg, out, stage=stage, seed=recipe.seed, device=device,
                 image_size=recipe.data.image_size, workers=recipe.data.workers, resume=resume,
                 fingerprint=inputs if path == "per_sample" else f"{inputs}+{path}",  # a resume keeps its data path
                 metrics_path=recipe.run_dir / "metrics.jsonl", augment=augment)


FEATURE_SPLITS = {"train": "data.train", "test": "data.test", "assign_to": "cluster.assign_to"}


def features_inputs(recipe: Recipe, split: str) -> str:
    return f"{teacher_inputs(recipe)}-{split}-{recipe.digest(FEATURE_SPLITS[split])}"


def features_stage(recipe: Recipe, split: str = "train") -> FeatureStore:
    """The run teacher's features of one split (un-augmented), streamed to features/<split>/; resumable."""
    if split not in FEATURE_SPLITS:
        raise DataError(f"unknown feature split {split!r}; choose from {', '.join(FEATURE_SPLITS)}")
    source = {"train": recipe.data.train, "test": recipe.data.test, "assign_to": recipe.cluster.assign_to}[split]
    if source is None:
        raise DataError(f"no {FEATURE_SPLITS[split]} in the recipe: set it to extract its features")
    run_dir = prepare(recipe)
    teacher_dir = run_dir / "teacher"
    if not _up_to_date(teacher_dir, teacher_inputs(recipe)):
        raise CheckpointError(f"no teacher for this recipe in {teacher_dir}: run `kt-edge train-teacher` first")
    out, inputs = run_dir / "features" / split, features_inputs(recipe, split)
    try:
        store = FeatureStore.open(out)
    except DataError:  # absent or unfinished: extract (finished shards of the same inputs are kept)
        store = None
    distributed.barrier()  # every rank has looked before rank 0 may clear stale shards
    if store is not None and store.fingerprint == inputs:
        if distributed.is_main():
            console.print(f"features: {split} up to date in {out}")
        return store
    images = open_source(source, recipe.seed).with_transform(eval_transform(recipe.data.image_size))
    store = extract(load_backbone(teacher_dir)[0], images, out, device=resolve_device(recipe.device),
                    workers=recipe.data.workers, fingerprint=inputs)
    if distributed.is_main():
        console.print(f"features: {store.n} x {store.dim} teacher features of {FEATURE_SPLITS[split]} -> {out}")
    return store


def cluster_inputs(recipe: Recipe) -> str:
    return recipe.digest("seed", "data.train", "data.image_size", "teacher", "cluster")


def cluster_stage(recipe: Recipe) -> Path:
    """k-means on the teacher's data.train features; pseudo-labels for data.train, or for cluster.assign_to.

    Writes clusters/centroids.npy (+ sidecar), pseudo_labels.npy (int64, one per image in dataset
    order) and report.json last, which marks the stage complete.
    """
    run_dir = prepare(recipe)
    out, inputs, cfg = run_dir / "clusters", cluster_inputs(recipe), recipe.cluster
    report_path = out / "report.json"
    done = (report_path.is_file() and json.loads(report_path.read_text()).get("inputs") == inputs
            and (out / "pseudo_labels.npy").is_file())
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
        raise DataError(f"cluster.pca_dim {cfg.pca_dim} must be at most the feature dim {store.dim} and below "
                        f"the {n_fit} points k-means is fitted on; lower it or unset it")
    sets = {"data.train": store}
    if cfg.assign_to is not None:
        sets["cluster.assign_to"] = features_stage(recipe, "assign_to")
    if not distributed.is_main():  # every rank helps extract; rank 0 alone clusters and writes
        distributed.barrier()
        return out
    model, _ = fit_clusters(store, cfg.k, pca_dim=cfg.pca_dim, normalize=cfg.normalize, niter=cfg.niter,
                            seed=recipe.seed, max_points_per_centroid=cfg.max_points_per_centroid,
                            use_gpu=cfg.use_gpu)
    save_centroids(out / "centroids.npy", model)
    target = "cluster.assign_to" if cfg.assign_to is not None else "data.train"
    reports, assigned = {}, {}
    for name, features in sets.items():
        assigned[name], _ = model.assign(features)
        reports[name] = cluster_report(assigned[name], features.labels, cfg.k)
    with atomic.atomic_path(out / "pseudo_labels.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, assigned[target])
    atomic.write_json(report_path, {"inputs": inputs, "k": cfg.k, "pseudo_labels_of": target,
                                    "kmeans": model.meta, "sets": reports})
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
        table.add_row(name, str(r["n"]), str(r["k"]), str(r["empty_clusters"]),
                      f"{r['size_min']}/{r['size_median']:g}/{r['size_max']}", *scores)
    Console().print(table)


def _pseudo_labelled(recipe: Recipe) -> Images:
    """The cluster stage's pseudo-labels on the images they label (running features and cluster if needed)."""
    labels = np.load(cluster_stage(recipe) / "pseudo_labels.npy")
    images = training_images(recipe, recipe.cluster.assign_to)
    if len(labels) != len(images):
        raise DataError(f"{len(labels)} pseudo-labels for {len(images)} images of {images.name}: "
                        f"delete {recipe.run_dir / 'clusters'} and run again")
    return DISTILLERS[recipe.distill.method].training_set(images, labels, recipe.distill.options)


def labelled_splits(recipe: Recipe) -> tuple[Images, Images]:
    """The k-NN bank (train split) and the scored split, both labelled and with the same classes."""
    if recipe.data.test is None:
        raise DataError("evaluation needs a labelled split: set data.test in the recipe")
    train_set = open_source(recipe.data.train, recipe.seed)
    test_set = open_source(recipe.data.test, recipe.seed)
    for split in (train_set, test_set):
        if not split.labelled:
            raise DataError(f"{split.name}: evaluation needs labels (an ImageFolder tree or CIFAR-10 pickles)")
    if train_set.classes != test_set.classes:
        only_train = sorted(set(train_set.classes) - set(test_set.classes))
        only_test = sorted(set(test_set.classes) - set(train_set.classes))
        raise DataError(f"classes differ between {train_set.name} ({len(train_set.classes)}) and "
                        f"{test_set.name} ({len(test_set.classes)}): only in the first {_few(only_train)}, "
                        f"only in the second {_few(only_test)}")
    transform = eval_transform(recipe.data.image_size)
    return train_set.with_transform(transform), test_set.with_transform(transform)


def _few(names: list[str]) -> str:
    return "[" + ", ".join(names[:5]) + (f", ... {len(names)} in all" if len(names) > 5 else "") + "]"


def evaluate(recipe: Recipe) -> dict:
    """Every eval protocol for the teacher, the student and (as the floor) a random-init student, plus transfer;
    written to eval/results.json as {model: {metric: value}}."""
    from kt_edge.evaluate.protocols import evaluate_model, evaluate_transfer, transfer_splits

    run_dir = prepare(recipe)
    train_set, test_set = labelled_splits(recipe)
    device = resolve_device(recipe.device)
    models = {}
    for name, folder in (("teacher", run_dir / "teacher"), ("student", run_dir / "student")):
        if read_sidecar(folder) is not None:
            models[name] = load_backbone(folder)[0]
    if not models:
        raise CheckpointError(f"nothing to evaluate in {run_dir}: train a teacher or a student first")
    if recipe.eval.baseline:
        torch.manual_seed(recipe.seed)
        models["random_init"] = build_backbone(recipe.distill.student, recipe.data.image_size)
    transfer = transfer_splits(recipe.eval, recipe.data.image_size, recipe.seed)
    results = {}
    for name, model in models.items():
        results[name] = evaluate_model(model, train_set, test_set, recipe.eval, recipe.seed, device,
                                       recipe.data.workers)
        results[name].update(evaluate_transfer(model, recipe.eval, recipe.data.image_size, recipe.seed, device,
                                               recipe.data.workers, splits=transfer))
        console.print(f"eval: {name} " + ", ".join(f"{metric} {value:.2f}" for metric, value in results[name].items()))
    atomic.write_json(run_dir / "eval" / "results.json", results)
    return results


def export(recipe: Recipe) -> dict:
    from kt_edge.export.bundle import build_bundle

    run_dir = prepare(recipe)
    student_dir = run_dir / "student"
    card = read_sidecar(student_dir)
    if card is None:
        raise CheckpointError(f"no student in {student_dir}: run `kt-edge distill` first")
    train_set, test_set = labelled_splits(recipe)
    provenance = {"recipe": recipe.digest(), "teacher": recipe.teacher.method, "teacher_arch": recipe.teacher.arch,
                  "method": recipe.distill.method, "student": card["arch"]}
    results_path = run_dir / "eval" / "results.json"
    if results_path.is_file():
        provenance["metrics"] = json.loads(results_path.read_text())
    return build_bundle(student_dir, run_dir / "bundle", train_set, test_set, recipe.export, recipe.seed, provenance)


def run_all(recipe: Recipe, resume: bool = False) -> None:
    """teacher -> [features -> cluster, when distill.method needs them] -> distill -> eval -> export, then the
    summary table."""
    train_teacher(recipe, resume)
    needs = distill_needs(recipe)
    if needs == "pseudo_labels":
        cluster_stage(recipe)  # extracts the teacher's features first
    elif needs == "cached_features":
        features_stage(recipe, "train")
    distill(recipe, resume)
    if not distributed.is_main():  # under torchrun, evaluation and export are rank 0's
        return
    results = evaluate(recipe)
    report = export(recipe)
    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    table = Table(title=f"kt-edge run {recipe.name}: evaluation on {recipe.data.test.path}")
    table.add_column("metric")
    for name in results:
        table.add_column(name.replace("_", "-"), justify="right")
    for metric in metrics:
        table.add_row(metric, *(f"{row[metric]:.2f}" if metric in row else "" for row in results.values()))
    Console().print(table)
    parity = Table(title="export parity (ONNX Runtime vs PyTorch fp32)")
    for column in ("precision", "golden", "min cosine", "k-NN top-1 drop", "verdict"):
        parity.add_column(column)
    for precision, res in report["results"].items():
        parity.add_row(precision, f"{res['golden']['samples']} samples", f"{res['golden']['min_cosine']:.6f}",
                       f"{res['accuracy']['drop']:+.2f}", "PASS" if res["passed"] else "FAIL")
    Console().print(parity)
    Console().print(f"bundle: {report['bundle']}")
