"""Folders nobody cleaned: every odd or broken image is either decoded to 8-bit RGB or skipped, named and
counted once when the data is opened, so an epoch never meets it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kt_edge.data.augment import moco_v2
from kt_edge.data.sources import load_rgb, open_images
from kt_edge.errors import DataError


def _noise(size=(16, 16)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))


def folder_with(tmp_path, **odd_files) -> Path:
    """Four ordinary images plus the given ones (name -> bytes or a PIL image)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        _noise().save(folder / f"ok{i}.png")
    for name, content in odd_files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            content.save(folder / name)
    return folder


def assert_skipped(folder, name: str, reason: str, strict_too: bool = True) -> None:
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable file\(s\) of 5: {name} \({reason}"):
        images = open_images(folder)
    assert len(images) == 4 and all(p.name != name for p in images.paths)
    if strict_too:
        with pytest.raises(DataError, match=rf"{name}: {reason}.*strict mode"):
            open_images(folder, strict=True)


def assert_decoded(folder, name: str) -> np.ndarray:
    images = open_images(folder)
    assert len(images) == 5
    index = [p.name for p in images.paths].index(name)
    image, _ = images[index]
    assert image.mode == "RGB"
    return np.asarray(image)


def test_truncated_jpeg(tmp_path):
    jpeg = tmp_path / "full.jpg"
    _noise((64, 64)).save(jpeg)
    assert_skipped(folder_with(tmp_path, **{"cut.jpg": jpeg.read_bytes()[:300]}), "cut.jpg", "not a readable image")


def test_zero_byte_file(tmp_path):
    assert_skipped(folder_with(tmp_path, **{"empty.png": b""}), "empty.png", "empty file")


def test_non_image_files(tmp_path):
    folder = folder_with(tmp_path, **{"notes.jpg": b"just text, named like a photo"})
    assert_skipped(folder, "notes.jpg", r"not a readable image \(UnidentifiedImageError\)")


def test_huge_image_over_the_decompression_bomb_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)
    # 50x50 lies between the limit and twice the limit, where PIL itself only warns: refused all the same
    folder = folder_with(tmp_path, **{"huge.png": _noise((50, 50)), "huger.png": _noise((80, 80))})
    with pytest.warns(
        UserWarning,
        match=r"skipped 2 unreadable file\(s\) of 6: huge.png \(too large .*"
        r"MAX_IMAGE_PIXELS.*\), huger.png \(too large",
    ):
        images = open_images(folder)
    assert len(images) == 4
    with pytest.raises(DataError, match="huge.png: too large.*strict mode"):
        open_images(folder, strict=True)
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(folder / "huge.png")  # also refused when decoded later


def test_cmyk_jpeg(tmp_path):
    pixels = assert_decoded(folder_with(tmp_path, **{"cmyk.jpg": Image.new("CMYK", (8, 8), (0, 0, 0, 0))}), "cmyk.jpg")
    assert pixels.min() >= 250  # no ink is white


def test_16_bit_png(tmp_path):
    deep = np.full((8, 8), 65535, np.uint16)
    deep[0, 0], deep[0, 1] = 0, 32768
    pixels = assert_decoded(folder_with(tmp_path, **{"deep.png": Image.fromarray(deep)}), "deep.png")
    assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[0, 1].tolist() == [
        128,
        128,
        128,
    ]  # 32768 / 257 = 127.5, rounded
    assert pixels[1, 1].tolist() == [255, 255, 255]  # scaled, not clipped to white from 256 up


def test_grayscale(tmp_path):
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    pixels = assert_decoded(folder_with(tmp_path, **{"gray.png": gray}), "gray.png")
    assert (pixels[..., 0] == np.arange(64).reshape(8, 8)).all() and (pixels == pixels[..., :1]).all()


def test_palette(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0] * (254 * 3))
    pixels = assert_decoded(folder_with(tmp_path, **{"palette.gif": palette}), "palette.gif")
    assert (pixels == [200, 30, 10]).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    if mode == "P":
        image = Image.new("P", (8, 8), 0)
        image.putpalette([10, 20, 30] + [0] * 765)
        image.info["transparency"] = 0
    else:
        image = Image.new(mode, (8, 8), (10, 20, 30, 0) if mode == "RGBA" else (10, 0))
    pixels = assert_decoded(folder_with(tmp_path, **{"clear.png": image}), "clear.png")
    assert (pixels == 255).all()  # fully transparent: the background, not the hidden colour


def test_a_mixed_folder_goes_through_a_whole_training_epoch(tmp_path):
    """Every kind above in one folder: opening counts the broken ones once, the epoch meets none of them."""
    jpeg = tmp_path / "full.jpg"
    _noise((64, 64)).save(jpeg)
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    folder = folder_with(
        tmp_path,
        **{
            "cut.jpg": jpeg.read_bytes()[:300],
            "empty.png": b"",
            "notes.txt": b"text",
            "cmyk.jpg": Image.new("CMYK", (20, 12)),
            "deep.png": Image.fromarray(np.full((9, 9), 4000, np.uint16)),
            "gray.png": Image.new("L", (5, 40)),
            "palette.gif": Image.new("P", (7, 7)),
            "alpha.png": transparent,
        },
    )
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable file\(s\) of 12") as caught:
        images = open_images(folder)
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    loader = torch.utils.data.DataLoader(images.with_transform(moco_v2(32)), batch_size=4)
    batches = [x for x, _ in loader]
    assert sum(len(x) for x in batches) == 9
    assert all(x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all() for x in batches)


def _messy_tree(root: Path) -> Path:
    """An ImageFolder tree with a readable class (ten images, a dangling link, a symlink loop) and a class
    folder nobody may read."""
    for name in ("readable", "locked"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            _noise().save(root / name / f"{i}.png")
    (root / "readable" / "gone.png").symlink_to(root / "nowhere.png")
    (root / "readable" / "loop.png").symlink_to(root / "readable" / "loop.png")
    (root / "locked").chmod(0)
    return root


def _train_on(tmp_path, tree: Path):
    """One training step of a small teacher on ``tree``, in a process that file permissions bind."""
    import yaml
    from process_kit import kt_edge, without_dac_override
    from sample_kit import tiny_recipe_dict

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            tiny_recipe_dict(
                tmp_path / "runs",
                data={"train": {"path": str(tree)}},
                teacher={
                    "arch": "alexnet",
                    "method": "moco",
                    "options": {"queue": 8, "hidden": 16, "dim": 8},
                    "train": {"epochs": 1, "max_steps": 1, "batch_size": 8, "checkpoint_every": 1},
                },
            )
        )
    )
    return kt_edge("train-teacher", recipe, prefix=without_dac_override())


def test_unreadable_folders_and_broken_links_are_skipped_and_counted_in_one_warning(tmp_path):
    from process_kit import error_lines, finish

    tree = _messy_tree(tmp_path / "[" / "x]")  # brackets: the warning is plain text too
    try:
        code, err = finish(_train_on(tmp_path, tree))
    finally:
        (tree / "locked").chmod(0o755)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {tree}: skipped 2 unreadable file(s) of 12 and 1 unreadable folder(s): locked "
        "(folder not readable: Permission denied), gone.png (dangling symlink), loop.png (symlink "
        "loop)"
    ], err
    assert not error_lines(err)
    assert (tmp_path / "runs" / "tiny" / "teacher" / "model.json").is_file()


def test_an_unreadable_data_folder_is_one_error_line(tmp_path):
    from process_kit import error_lines, finish

    tree = _messy_tree(tmp_path / "tree")
    tree.chmod(0)
    try:
        code, err = finish(_train_on(tmp_path, tree))
    finally:
        tree.chmod(0o755)
        (tree / "locked").chmod(0o755)
    assert code == 2, err
    assert error_lines(err) == [f"error: {tree}: the data folder cannot be read (Permission denied)"], err
