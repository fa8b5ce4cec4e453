"""The uint8 image cache: exact pixels, sidecar, resumable and never half-taken, stale detection, CLI."""

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from sample_kit import SAMPLE, tiny_recipe_dict
from typer.testing import CliRunner

from kt_edge.cli import app
from kt_edge.data import cache as cache_mod
from kt_edge.data.cache import build_cache, cache_folder, cached_source, open_cache, source_fingerprint
from kt_edge.data.sources import load_rgb, open_images
from kt_edge.errors import DataError
from kt_edge.recipe import DataSource

SHARED = Path(os.environ.get("KT_EDGE_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def _small_folder(tmp_path, n=24) -> Path:
    """A copy of a few sample images (so tests may touch the files) in an ImageFolder tree."""
    images = open_images(SAMPLE / "train", subset=n, seed=0)
    for path in images.paths:
        target = tmp_path / "src" / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return tmp_path / "src"


def test_cache_holds_the_decoded_pixels_labels_and_a_sidecar(tmp_path):
    src = _small_folder(tmp_path)
    source = DataSource(path=src)
    cached = cached_source(source, 32, seed=0, root=tmp_path / "cache", progress=False)
    files = open_images(src)
    assert len(cached) == len(files) == 24
    assert cached.array.shape == (24, 32, 32, 3) and cached.array.dtype == np.uint8
    for i in (0, 7, 23):  # 32 px images are cached exactly as decoded
        np.testing.assert_array_equal(cached.array[i], np.asarray(load_rgb(files.paths[i])))
    np.testing.assert_array_equal(cached.labels, files.labels)
    assert cached.classes == files.classes
    card = json.loads((cached.root / "cache.json").read_text())
    assert card["n"] == 24 and card["size"] == 32 and card["labels"] == "labels.npy"
    assert card["source"] == str(src) and card["fingerprint"] == source_fingerprint(src)
    assert not (cached.root / "progress.json").exists() and not (cached.root / "images.partial.npy").exists()


def test_larger_images_are_resized_on_the_shorter_side_then_centre_cropped(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 20:60] = 255  # a white centre square on black sides
    Image.fromarray(pixels).save(folder / "a.png")
    cached = cached_source(DataSource(path=folder), 20, seed=0, root=tmp_path / "cache", progress=False)
    image = cached.array[0]
    assert image.shape == (20, 20, 3)
    assert image[:, 1:-1].min() >= 250  # the 40x40 white centre became the 20x20 crop (antialiased edges)
    assert image.mean() > 245
    assert cached.labels.tolist() == [-1]


def test_interrupted_build_is_never_taken_as_complete_and_resumes(tmp_path, monkeypatch):
    images = open_images(SAMPLE / "train", subset=40, seed=0)
    straight = build_cache(images, tmp_path / "straight", 32, "fp", chunk=16, progress=False)

    calls = {"n": 0}
    real_write = cache_mod.write_json

    def crash_after_first_chunk(path, obj):
        real_write(path, obj)
        if Path(path).name == "progress.json":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt("killed")

    monkeypatch.setattr(cache_mod, "write_json", crash_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_cache(images, tmp_path / "resumed", 32, "fp", chunk=16, progress=False)
    monkeypatch.setattr(cache_mod, "write_json", real_write)
    with pytest.raises(DataError, match="not a finished image cache"):
        open_cache(tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "progress.json").read_text())["rows"] == 16

    decoded = []
    real_decode = cache_mod._Decode.__call__
    monkeypatch.setattr(cache_mod._Decode, "__call__", lambda self, im: decoded.append(1) or real_decode(self, im))
    resumed = build_cache(images, tmp_path / "resumed", 32, "fp", chunk=16, progress=False)
    assert len(decoded) == 24  # only the rows after the first chunk were decoded again
    np.testing.assert_array_equal(np.asarray(resumed.array), np.asarray(straight.array))


def test_partial_build_of_other_inputs_starts_over(tmp_path):
    images = open_images(SAMPLE / "train", subset=20, seed=0)
    folder = tmp_path / "c"
    folder.mkdir()
    np.lib.format.open_memmap(folder / "images.partial.npy", mode="w+", dtype=np.uint8, shape=(20, 32, 32, 3))
    (folder / "progress.json").write_text(json.dumps({"n": 20, "size": 32, "fingerprint": "other", "rows": 16}))
    cached = build_cache(images, folder, 32, "fp", chunk=8, progress=False)
    assert np.asarray(cached.array).any(), "stale zero rows were kept"
    np.testing.assert_array_equal(cached.array[19], np.asarray(images.image(19)))


def test_changed_source_is_rebuilt_and_folder_depends_on_the_recipe(tmp_path):
    src = _small_folder(tmp_path, n=12)
    source = DataSource(path=src)
    first = cached_source(source, 32, seed=0, root=tmp_path / "cache", progress=False)
    assert len(first) == 12
    victim = next(src.rglob("*.jpg"))
    victim.unlink()
    second = cached_source(source, 32, seed=0, root=tmp_path / "cache", progress=False)
    assert second.root == first.root and len(second) == 11
    assert cache_folder(source, 32, 0, "x") != cache_folder(source, 48, 0, "x")
    assert cache_folder(DataSource(path=src, subset=5), 32, 0, "x") != cache_folder(
        DataSource(path=src, subset=5), 32, 1, "x"
    )
    assert cache_folder(source, 32, 0, "x") == cache_folder(source, 32, 1, "x")  # seed only matters for subsets


def test_cached_images_pickle_without_their_pixels(tmp_path):
    cached = cached_source(DataSource(path=SAMPLE / "train", subset=64), 32, seed=0, root=tmp_path, progress=False)
    first = np.array(cached.array[5])
    blob = pickle.dumps(cached)
    assert len(blob) < 64 * 32 * 32 * 3 / 4
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.array[5], first)
    image, label = cached.with_transform(lambda im: np.asarray(im))[5]
    np.testing.assert_array_equal(image, first)
    assert label == cached.labels[5]


def test_cli_builds_the_cache_and_training_reads_it(tmp_path):
    data = tiny_recipe_dict(tmp_path / "runs")
    data["data"].update(cache=True, cache_dir=str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["data", "cache", str(recipe), "--split", "test"])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "cache").iterdir()
    assert folder.name.startswith("cifar10-test-32px-") and json.loads((folder / "cache.json").read_text())["n"] == 128
    result = CliRunner().invoke(app, ["data", "cache", str(recipe), "--split", "valid"])
    assert result.exit_code != 0


@pytest.mark.skipif(not (SHARED / "imagenette" / "val").is_dir(), reason="shared image data not found")
def test_cache_of_real_imagenette_jpegs_at_a_training_size(tmp_path):
    source = DataSource(path=SHARED / "imagenette" / "val", subset=16)
    cached = cached_source(source, 64, seed=0, root=tmp_path, progress=False)
    files = open_images(source.path, subset=16, seed=0)
    assert cached.array.shape == (16, 64, 64, 3)
    expected = np.asarray(load_rgb(files.paths[3]).resize((64, 64), Image.BILINEAR), dtype=np.float32)
    assert np.abs(cached.array[3].astype(np.float32) - expected).mean() < 3  # square 160 px -> 64 px, antialiased
