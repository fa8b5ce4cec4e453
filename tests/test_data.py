import numpy as np
import pytest
from PIL import Image
from sample_kit import SAMPLE

from kt_edge.data.sources import open_images
from kt_edge.errors import DataError


def _folder_with_bad_files(root):
    good = root / "cat"
    good.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(good / f"{i}.png")
    jpeg = good / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    (good / "empty.jpg").write_bytes(b"")
    (good / "notes.txt").write_text("not an image")
    return root


def test_imagefolder_sample_is_labelled_and_balanced():
    images = open_images(SAMPLE / "test")
    assert len(images) == 500 and images.labelled
    assert np.bincount(images.labels).tolist() == [50] * 10
    image, label = images[0]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 0


def test_corrupt_files_are_skipped_and_counted_once(tmp_path):
    root = _folder_with_bad_files(tmp_path / "data")
    with pytest.warns(UserWarning, match="skipped 3 unreadable file"):
        images = open_images(root)
    assert len(images) == 3


def test_strict_mode_refuses_corrupt_files(tmp_path):
    root = _folder_with_bad_files(tmp_path / "data")
    with pytest.raises(DataError, match="strict mode"):
        open_images(root, strict=True)


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(4):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"{i}.png")  # grayscale becomes RGB
    images = open_images(tmp_path)
    assert len(images) == 4 and not images.labelled
    assert images[0][0].mode == "RGB"


def test_seeded_subset_is_reproducible():
    a = open_images(SAMPLE / "train", subset=50, seed=3)
    b = open_images(SAMPLE / "train", subset=50, seed=3)
    c = open_images(SAMPLE / "train", subset=50, seed=4)
    assert a.paths == b.paths and a.paths != c.paths and len(a) == 50


def test_cifar_pickles_through_torchvision(tmp_path, monkeypatch):
    import pickle

    from torchvision.datasets import cifar

    # synthetic pickles in the real format; only the md5 check of the official files is bypassed
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {"data": rng.integers(0, 255, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    images = open_images(tmp_path, format="cifar10", split="test")
    assert len(images) == 10 and images.labelled
    assert images[3][0].size == (32, 32) and images[3][1] == 3


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        open_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        open_images(tmp_path / "empty")
