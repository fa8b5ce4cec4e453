"""Image file -> model input, exactly as the bundle's manifest describes.

Matches torchvision's Resize(resize) + CenterCrop(crop) + ToTensor() +
Normalize(mean, std) on PIL images: PIL's bilinear resize (which antialiases
when shrinking), the shorter side scaled to `resize`, the crop offsets rounded
like torchvision's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps

from .bundle import InputSpec

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> upright 8-bit RGB: the one decoding rule of training (host) and device alike.

    EXIF orientation applied; 16-bit samples scaled by their format's peak (65535, or 255 when every
    value fits in 8 bits: 8-bit data stored in a 16-bit file); transparency composited onto white;
    grayscale, palette and CMYK converted by Pillow.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if wide.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.rint(wide * (255.0 / peak)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ValueError("floating-point images are not supported: their value range is unknown")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file with to_rgb. Pillow's own errors pass through (the host reports their type); an
    image over ``Image.MAX_IMAGE_PIXELS`` is refused, not only warned about as Pillow does below twice that."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except Image.DecompressionBombWarning as exc:
            raise Image.DecompressionBombError(str(exc)) from None
    with opened as image:
        image.load()
        return to_rgb(image)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side equals size, keeping aspect ratio (torchvision's rule)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return image
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Central size x size square; offsets rounded as torchvision's CenterCrop does."""
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"image of {w}x{h} is smaller than the crop {size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess_image(image: Image.Image, spec: InputSpec) -> np.ndarray:
    """A PIL image -> float32 [3, crop, crop], normalised."""
    image = center_crop(resize_shorter(to_rgb(image), spec.resize), spec.crop)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_file(path: str | os.PathLike, spec: InputSpec) -> np.ndarray:
    """An image file -> float32 [3, crop, crop]; an unreadable file is a ValueError naming it."""
    try:
        image = load_rgb(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    return preprocess_image(image, spec)


def preprocess_batch(paths: Iterable[str | os.PathLike], spec: InputSpec) -> np.ndarray:
    """Image files -> float32 [N, 3, crop, crop]."""
    arrays = [preprocess_file(p, spec) for p in paths]
    if not arrays:
        return np.zeros((0, *spec.shape), dtype=np.float32)
    return np.stack(arrays)
