"""The features stage: the run teacher's embeddings of one split, streamed to fp16 shards."""

from __future__ import annotations

from kt_edge.data.augment import eval_transform
from kt_edge.data.sources import open_source
from kt_edge.engine import distributed
from kt_edge.engine.device import resolve_device
from kt_edge.errors import CheckpointError, DataError
from kt_edge.features import FeatureStore, extract
from kt_edge.models.checkpoint import load_backbone
from kt_edge.recipe import Recipe
from kt_edge.stages.inputs import FEATURE_SPLITS, console, features_inputs, prepare, teacher_inputs, up_to_date


def features_stage(recipe: Recipe, split: str = "train") -> FeatureStore:
    """The run teacher's features of one split (un-augmented), streamed to features/<split>/; resumable."""
    if split not in FEATURE_SPLITS:
        raise DataError(f"unknown feature split {split!r}; choose from {', '.join(FEATURE_SPLITS)}")
    source = {"train": recipe.data.train, "test": recipe.data.test, "assign_to": recipe.cluster.assign_to}[split]
    if source is None:
        raise DataError(f"no {FEATURE_SPLITS[split]} in the recipe: set it to extract its features")
    run = prepare(recipe)
    teacher_dir = run.teacher
    if not up_to_date(teacher_dir, teacher_inputs(recipe)):
        raise CheckpointError(f"no teacher for this recipe in {teacher_dir}: run `kt-edge train-teacher` first")
    out, inputs = run.features(split), features_inputs(recipe, split)
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
    store = extract(
        load_backbone(teacher_dir)[0],
        images,
        out,
        device=resolve_device(recipe.device),
        workers=recipe.data.workers,
        fingerprint=inputs,
    )
    if distributed.is_main():
        console.print(f"features: {store.n} x {store.dim} teacher features of {FEATURE_SPLITS[split]} -> {out}")
    return store
