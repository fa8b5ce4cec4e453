"""The features stage: the run teacher's embeddings of one split, streamed to fp16 shards."""

from __future__ import annotations

from pathlib import Path

from kt_edge.data.augment import eval_transform
from kt_edge.data.sources import open_source
from kt_edge.engine import distributed
from kt_edge.engine.device import resolve_device
from kt_edge.features import FeatureStore, extract
from kt_edge.models.checkpoint import load_backbone
from kt_edge.recipe import Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages.inputs import FEATURE_SPLITS, console, feature_source, features_inputs


def extract_features(recipe: Recipe, split: str, teacher: Path) -> FeatureStore:
    """The teacher's features of one split (un-augmented), streamed to features/<split>/; finished shards of
    the same inputs are kept."""
    out = RunDir(recipe.run_dir).features(split)
    images = open_source(feature_source(recipe, split), recipe.seed)
    store = extract(
        load_backbone(teacher)[0],
        images.with_transform(eval_transform(recipe.data.image_size)),
        out,
        device=resolve_device(recipe.device),
        workers=recipe.data.workers,
        fingerprint=features_inputs(recipe, split),
    )
    if distributed.is_main():
        console.print(f"features: {store.n} x {store.dim} teacher features of {FEATURE_SPLITS[split]} -> {out}")
    return store
