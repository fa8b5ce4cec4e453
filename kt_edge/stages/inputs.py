"""What a stage reads: the run directory, the digests that decide whether it reruns, and its images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from rich.console import Console

from kt_edge import atomic
from kt_edge.data.cache import cached_source
from kt_edge.data.labelled import labelled_pair
from kt_edge.data.sources import Images, open_source
from kt_edge.engine import distributed
from kt_edge.engine.method import Needs
from kt_edge.engine.method import needs as method_needs
from kt_edge.errors import DataError
from kt_edge.recipe import DataSource, Recipe
from kt_edge.run_dir import RunDir
from kt_edge.stages import stamp
from kt_edge.teachers import TEACHERS
from kt_edge.transfer import DISTILLERS

console = Console(stderr=True, markup=False)  # paths are printed as they are, brackets included


def prepare(recipe: Recipe) -> RunDir:
    """Join torchrun's process group if there is one; create the run directory, with the resolved recipe when
    it is a new run (an existing run's recipe is rewritten only by a command that succeeded: record_recipe)."""
    distributed.init_from_env(recipe.device)
    run = RunDir(recipe.run_dir)
    if distributed.is_main():
        run.root.mkdir(parents=True, exist_ok=True)
        if not run.recipe.is_file():
            atomic.write_text(run.recipe, recipe.to_yaml())
    return run


def record_recipe(recipe: Recipe) -> None:
    """Make the run's recipe.yaml the recipe of a command that succeeded (what report and compare read)."""
    path, text = RunDir(recipe.run_dir).recipe, recipe.to_yaml()
    if distributed.is_main() and recipe.run_dir.is_dir() and not (path.is_file() and path.read_text() == text):
        atomic.write_text(path, text)


def training_images(recipe: Recipe, source=None) -> Images:
    """A training split (data.train by default): its uint8 cache when data.cache is set, else the files."""
    source = source or recipe.data.train
    if recipe.data.cache:
        return cached_source(
            source, recipe.data.image_size, recipe.seed, recipe.data.cache_dir, workers=recipe.data.workers
        )
    return open_source(source, recipe.seed)


def cache_data(recipe: Recipe, split: str = "train") -> Path:
    """Decode data.<split> once into the uint8 cache that training reads with data.cache: true."""
    source = {"train": recipe.data.train, "test": recipe.data.test}.get(split)
    if source is None:
        raise DataError(
            f"no data.{split} in the recipe"
            if split in ("train", "test")
            else f"unknown split {split!r}; choose train or test"
        )
    images = cached_source(
        source, recipe.data.image_size, recipe.seed, recipe.data.cache_dir, workers=recipe.data.workers
    )
    console.print(f"cache: {len(images)} images of data.{split} at {recipe.data.image_size}px in {images.root}")
    return images.root


def teacher_inputs(recipe: Recipe) -> str:
    return recipe.digest("seed", "data.train", "data.image_size", "teacher")


def student_inputs(recipe: Recipe) -> str:
    needs = distill_needs(recipe)
    keys = ["seed", "data.train", "data.image_size", "distill"]
    if needs is not Needs.NOTHING:
        keys.insert(3, "teacher")
    if needs is Needs.PSEUDO_LABELS:
        keys.append("cluster")
    return recipe.digest(*keys)


def distill_needs(recipe: Recipe) -> Needs:
    """What distill.method needs first; a teacher method needs nothing: the student trains alone, the
    self-supervised baseline distillation must beat."""
    if recipe.distill.method in TEACHERS:
        return Needs.NOTHING
    return method_needs(DISTILLERS[recipe.distill.method], recipe.distill.options)


FEATURE_SPLITS = {"train": "data.train", "test": "data.test", "assign_to": "cluster.assign_to"}


def feature_source(recipe: Recipe, split: str) -> DataSource:
    """The images whose teacher features ``split`` names; one line for a split the recipe does not have."""
    if split not in FEATURE_SPLITS:
        raise DataError(f"unknown feature split {split!r}; choose from {', '.join(FEATURE_SPLITS)}")
    source = {"train": recipe.data.train, "test": recipe.data.test, "assign_to": recipe.cluster.assign_to}[split]
    if source is None:
        raise DataError(f"no {FEATURE_SPLITS[split]} in the recipe: set it to extract its features")
    return source


def eval_inputs(recipe: Recipe, models: dict[str, Path]) -> str:
    """What eval/results.json depends on: the splits, the eval section, and the finished models it scores."""
    return _combine(
        recipe.digest("seed", "data.train", "data.test", "data.image_size", "eval", "distill.student"),
        {name: stamp.read(folder) for name, folder in models.items()},
    )


def export_inputs(recipe: Recipe) -> str:
    """What the bundle depends on: the student, the splits parity is measured on, the export section, and the
    evaluation results it carries as provenance."""
    run = RunDir(recipe.run_dir)
    return _combine(
        recipe.digest(
            "seed",
            "data.train",
            "data.test",
            "data.image_size",
            "export",
            "teacher.method",
            "teacher.arch",
            "distill.method",
        ),
        stamp.read(run.student),
        hashlib.sha256(run.results.read_bytes()).hexdigest() if run.results.is_file() else None,
    )


def _combine(*parts) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def features_inputs(recipe: Recipe, split: str) -> str:
    return f"{teacher_inputs(recipe)}-{split}-{recipe.digest(FEATURE_SPLITS[split])}"


def cluster_inputs(recipe: Recipe) -> str:
    return recipe.digest("seed", "data.train", "data.image_size", "teacher", "cluster")


def labelled_splits(recipe: Recipe) -> tuple[Images, Images]:
    """The k-NN bank (train split) and the scored split, both labelled and with the same classes."""
    if recipe.data.test is None:
        raise DataError("evaluation needs a labelled split: set data.test in the recipe")
    return labelled_pair(recipe.data.train, recipe.data.test, recipe.data.image_size, recipe.seed)
