"""The order of the stages, decided here and nowhere else.

Each stage is a function of the recipe and the artifacts of the stages before it; this module hands them
on. A stage whose output carries a "done" stamp (stamp.py) of the same inputs is skipped; any other is
run, its stamp deleted first and written last. Every command calls one of the functions below:
``teacher`` trains (or imports) the teacher; ``features``, ``clusters`` and ``student`` use the teacher a
``train-teacher`` left and make the features and clusters they need; ``run_stages`` trains everything.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable, TypeVar

from kt_edge_runtime.bundle import BundleError, load_bundle
from rich.console import Console
from rich.table import Table

from kt_edge.engine import distributed
from kt_edge.engine.method import Needs
from kt_edge.errors import CheckpointError, DataError
from kt_edge.features import FeatureStore
from kt_edge.models.checkpoint import WEIGHTS, read_sidecar
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages import stamp
from kt_edge.stages.cluster import cluster_stage
from kt_edge.stages.distill import distill
from kt_edge.stages.evaluate import evaluate
from kt_edge.stages.export import export
from kt_edge.stages.features import extract_features
from kt_edge.stages.inputs import (
    FEATURE_SPLITS,
    cluster_inputs,
    console,
    distill_needs,
    eval_inputs,
    export_inputs,
    feature_source,
    features_inputs,
    prepare,
    student_inputs,
    teacher_inputs,
)
from kt_edge.stages.teacher import train_teacher

T = TypeVar("T")


def _once(
    name: str,
    folder: Path,
    inputs: str,
    make: Callable[[], T],
    finished: Callable[[Path], T | None],
    every_rank: bool = True,
) -> T:
    """``finished(folder)`` when the stamp says ``folder`` was made from ``inputs`` (and ``finished`` finds
    it whole: not None), else ``make()`` between deleting the stamp and writing it. Under torchrun a stage
    of ``every_rank`` waits until every rank has looked; eval and export, which ``run_stages`` runs on rank 0
    alone, do not wait."""
    done = finished(folder) if stamp.fresh(folder, inputs) else None
    if every_rank:
        distributed.barrier()  # every rank has looked before rank 0 deletes the stamp
    if done is not None:
        if distributed.is_main():
            console.print(f"{name}: up to date in {folder}")
        return done
    if distributed.is_main():
        stamp.clear(folder)
    made = make()
    if distributed.is_main():
        stamp.write(folder, inputs)
    return made


def teacher(recipe: Recipe, resume: bool = False) -> Path:
    """The teacher in runs/<name>/teacher/: trained with teacher.method, or imported from teacher.checkpoint."""
    folder = prepare(recipe).teacher
    return _once("teacher", folder, teacher_inputs(recipe), lambda: train_teacher(recipe, resume), _whole_model)


def trained_teacher(recipe: Recipe) -> Path:
    """The teacher `kt-edge train-teacher` left for this recipe: the stages after it never train one."""
    folder = prepare(recipe).teacher
    if not (stamp.fresh(folder, teacher_inputs(recipe)) and _whole_model(folder)):
        raise CheckpointError(f"no teacher for this recipe in {folder}: run `kt-edge train-teacher` first")
    return folder


def features(recipe: Recipe, split: str = "train", teacher_dir: Path | None = None) -> FeatureStore:
    """The teacher's features of one split (data.train, data.test or cluster.assign_to)."""
    feature_source(recipe, split)  # one line for a split the recipe does not have, before the teacher is looked for
    teacher_dir = teacher_dir or trained_teacher(recipe)
    return _once(
        f"features of {FEATURE_SPLITS[split]}",
        prepare(recipe).features(split),
        features_inputs(recipe, split),
        lambda: extract_features(recipe, split, teacher_dir),
        _whole_store,
    )


def clusters(recipe: Recipe, teacher_dir: Path | None = None) -> Path:
    """The clusters folder (centroids, pseudo-labels, report); the features it needs are made first."""

    def make() -> Path:
        source = teacher_dir or trained_teacher(recipe)
        assign_to = features(recipe, "assign_to", source) if recipe.cluster.assign_to is not None else None
        return cluster_stage(recipe, features(recipe, "train", source), assign_to)

    def whole(folder: Path) -> Path | None:  # the pseudo-labels distill reads are there
        return folder if run.pseudo_labels.is_file() else None

    run = prepare(recipe)
    return _once("clusters", run.clusters, cluster_inputs(recipe), make, whole)


def student(recipe: Recipe, resume: bool = False, teacher_dir: Path | None = None) -> Path:
    """The student of distill.method, after what the method needs (the teacher, its features or clusters)."""

    def make() -> Path:
        needs = distill_needs(recipe)
        if needs is Needs.NOTHING:
            return distill(recipe, resume=resume)
        source = teacher_dir or trained_teacher(recipe)
        if needs is Needs.PSEUDO_LABELS:
            clusters(recipe, source)
            return distill(recipe, source, pseudo_labels=RunDir(recipe.run_dir).pseudo_labels, resume=resume)
        if needs is Needs.FEATURES:
            return distill(recipe, source, features=features(recipe, "train", source), resume=resume)
        return distill(recipe, source, resume=resume)

    return _once("student", prepare(recipe).student, student_inputs(recipe), make, _whole_model)


def evaluation(recipe: Recipe) -> dict:
    """eval/results.json for the run's finished teacher (with eval.teacher) and student."""
    run = prepare(recipe)
    names = ("teacher", "student") if recipe.eval.teacher else ("student",)
    models = {name: run.model(name) for name in names if _finished_model(run.model(name))}
    return _once(
        "eval",
        run.eval,
        eval_inputs(recipe, models),
        lambda: evaluate(recipe, models),
        lambda _folder: _results(run.results),
        every_rank=False,
    )


def bundle(recipe: Recipe) -> dict:
    """The verified device bundle of the run's student: {"bundle": folder, "results": parity per precision}."""
    run = prepare(recipe)
    if not _finished_model(run.student):
        raise CheckpointError(f"no student in {run.student}: run `kt-edge distill` first")
    make = partial(export, recipe, run.student)
    return _once("export", run.bundle, export_inputs(recipe), make, _verified_bundle, every_rank=False)


def _whole_model(folder: Path) -> Path | None:
    """A teacher or student folder holding its weights and the sidecar that vouches for them."""
    return folder if (folder / WEIGHTS).is_file() and read_sidecar(folder) is not None else None


def _finished_model(folder: Path) -> bool:
    """A model some recipe finished (eval scores it, export ships it, whatever its inputs were)."""
    return stamp.read(folder) is not None and _whole_model(folder) is not None


def _whole_store(folder: Path) -> FeatureStore | None:
    """The feature store if every shard it lists is there and readable, else None (it is extracted again)."""
    try:
        return FeatureStore.open(folder)
    except DataError:
        return None


def _results(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _verified_bundle(folder: Path) -> dict | None:
    """The bundle's parity results if it is whole (every sha256 checked) and passed parity, else None."""
    try:
        manifest = load_bundle(folder)
    except BundleError:
        return None
    return {"bundle": str(folder), "results": manifest.parity.results} if manifest.verified else None


def run_stages(recipe: Recipe, resume: bool = False, export_bundle: bool = True) -> tuple[dict, dict | None] | None:
    """teacher -> [features -> clusters, when distill.method needs them] -> student -> eval -> export; returns
    the evaluation results and the export report (None without ``export_bundle``, and None altogether on the
    ranks other than 0 under torchrun).  A student trained alone (distill.method a teacher method) skips the
    teacher."""
    teacher_dir = None if distill_needs(recipe) is Needs.NOTHING else teacher(recipe, resume)
    student(recipe, resume, teacher_dir)
    if not distributed.is_main():  # under torchrun, evaluation and export are rank 0's
        return None
    return evaluation(recipe), bundle(recipe) if export_bundle else None


def run_all(recipe: Recipe, resume: bool = False) -> None:
    """Every stage, then the summary tables."""
    done = run_stages(recipe, resume)
    if done is None:
        return
    results, report = done
    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    table = Table(title=f"kt-edge run {recipe.name}: evaluation on {recipe.data.test.path}")
    table.add_column("metric")
    for name in results:
        table.add_column(name.replace("_", "-"), justify="right")
    for metric in metrics:
        table.add_row(metric, *(f"{row[metric]:.2f}" if metric in row else "" for row in results.values()))
    Console().print(table)
    parity = Table(title="export parity (ONNX Runtime vs PyTorch fp32)")
    for column in ("precision", "test images", "min cosine", "1st percentile", "k-NN top-1 drop", "verdict"):
        parity.add_column(column)
    for precision, res in report["results"].items():
        cosine = res["split"]["cosine"]
        parity.add_row(
            precision,
            str(cosine["images"]),
            f"{cosine['min']:.6f}",
            f"{cosine['p1']:.6f}",
            f"{res['accuracy']['drop']:+.2f}",
            "PASS" if res["passed"] else "FAIL",
        )
    Console().print(parity)
    Console().print(f"bundle: {report['bundle']}")
