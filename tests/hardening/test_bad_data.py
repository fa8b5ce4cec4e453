"""Data that cannot train or score: refused before any compute, in one line that names the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sample_kit import tiny_recipe_dict
from typer.testing import CliRunner

from kt_edge.cli import app
from kt_edge.data.sources import open_images
from kt_edge.errors import DataError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.recipe import recipe_from_dict
from kt_edge.stages.inputs import labelled_splits
from kt_edge.teachers import TEACHERS
from kt_edge.transfer import DISTILLERS

QUEUES = [
    (section, name, key)
    for section, registry in (("teacher", TEACHERS), ("distill", DISTILLERS))
    for name, method in sorted(registry.items())
    for key in ("queue", "bank")
    if key in method.Options.model_fields
]


def cli(tmp_path, command: str, **sections):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "runs", **sections)))
    return CliRunner().invoke(app, [command, str(recipe)])


def image_tree(root, classes, per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def assert_refused_up_front(result, tmp_path, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    run_dir = tmp_path / "runs" / "tiny"
    assert not (run_dir / "metrics.jsonl").exists() and not list(run_dir.rglob("resume.pt"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images found"):
        open_images(tmp_path / "empty")
    result = cli(tmp_path, "train-teacher", data={"train": {"path": str(tmp_path / "empty")}})
    assert_refused_up_front(result, tmp_path, "no images found")


def test_class_folders_without_images(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "tree" / name).mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        open_images(tmp_path / "tree")


def test_folder_of_only_unreadable_files(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable"), pytest.raises(
        DataError, match=r"none of its 3 file\(s\) is a readable image"
    ):
        open_images(folder)


def test_dataset_smaller_than_the_batch(tmp_path):
    result = cli(
        tmp_path,
        "train-teacher",
        teacher={"train": {"max_steps": 3, "batch_size": 512}, "method": "rotation", "options": {}},
    )
    assert_refused_up_front(
        result, tmp_path, "256 images is fewer than one batch of 512; lower teacher.train.batch_size"
    )


def test_queue_as_large_as_the_dataset_through_the_cli(tmp_path):
    result = cli(tmp_path, "train-teacher", teacher={"options": {"queue": 256, "hidden": 64, "dim": 32}})
    assert_refused_up_front(result, tmp_path, "teacher.options.queue 256 is not smaller than the 256 training images")


@pytest.mark.parametrize("section, name, key", QUEUES)
@pytest.mark.parametrize("size", [64, 65])
def test_every_queue_and_memory_bank_must_be_smaller_than_the_dataset(section, name, key, size):
    torch.manual_seed(0)
    net = build_backbone("alexnet", 32)
    method = (TEACHERS if section == "teacher" else DISTILLERS)[name]
    with pytest.raises(
        DataError,
        match=rf"{section}.options.{key} {size} is not smaller than the 64 training "
        rf"images.*set {section}.options.{key} below 64",
    ):
        if section == "teacher":
            method(net, {key: size}, n_images=64)
        else:
            method(net, FrozenTeacher(build_backbone("alexnet", 32), torch.device("cpu")), {key: size}, n_images=64)


def test_a_queue_is_checked_for_every_method_that_has_one():
    assert {(s, n) for s, n, _ in QUEUES} >= {("teacher", "moco"), ("distill", "seed"), ("distill", "compress")}


def test_labelled_split_with_other_classes_than_the_train_split(tmp_path):
    train = image_tree(tmp_path / "train", ["cat", "dog", "fox"])
    test = image_tree(tmp_path / "test", ["cat", "dog", "owl"])
    data = {"train": {"path": str(train)}, "test": {"path": str(test)}, "image_size": 32, "workers": 0}
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path / "runs", data=data))
    with pytest.raises(
        DataError,
        match=r"classes differ .*\(3\) and .*\(3\): only in the first \[fox\], "
        r"only in the second \[owl\]",
    ):
        labelled_splits(recipe)
    result = cli(tmp_path, "eval", data=data)
    assert result.exit_code == 2 and "classes differ" in result.output, result.output


def test_unlabelled_split_cannot_be_scored(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / f"{i}.png")
    data = {"train": {"path": str(image_tree(tmp_path / "train", ["a"]))}, "test": {"path": str(flat)}}
    with pytest.raises(DataError, match="evaluation needs labels"):
        labelled_splits(recipe_from_dict(tiny_recipe_dict(tmp_path / "runs", data=data)))
