"""Fuzzed image files (cut, bit-flipped, spliced real images of every common format): opening a folder
either decodes them to RGB or skips and counts them, never raises, and never lets one into an epoch."""

from __future__ import annotations

import io
import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kt_edge.data.sources import open_images
from kt_edge.errors import DataError

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]


def _encoded(fmt: str) -> bytes:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


ORIGINALS = {fmt: _encoded(fmt) for fmt in FORMATS}


@st.composite
def damaged(draw):
    fmt = draw(st.sampled_from(FORMATS))
    data = bytearray(ORIGINALS[fmt])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "flip", "insert", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "cut":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "zero":
            data[at : at + draw(st.integers(1, 64))] = bytes(min(64, len(data) - at))
    return fmt, bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damaged())
def test_a_damaged_image_is_decoded_or_skipped(tmp_path, case):
    fmt, data = case
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    Image.new("RGB", (4, 4)).save(folder / "good.png")
    (folder / f"damaged.{fmt.lower()}").write_bytes(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            images = open_images(folder)
        except DataError as exc:  # only if nothing at all were readable, which good.png is
            raise AssertionError(f"refused the whole folder: {exc}") from None
    skipped = [w for w in caught if "skipped 1 unreadable file" in str(w.message)]
    assert len(images) + len(skipped) == 2
    for i in range(len(images)):
        image, _ = images[i]  # what an epoch does: must not raise
        assert image.mode == "RGB" and min(image.size) >= 1
