"""Image file -> model input, exactly as the bundle's manifest describes.

Matches torchvision's Resize(resize) + CenterCrop(crop) + ToTensor() +
Normalize(mean, std) on PIL images: PIL's bilinear resize (which antialiases
when shrinking), the shorter side scaled to `resize`, the crop offsets rounded
like torchvision's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from PIL import Image

from .bundle import InputSpec

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (grayscale, palette, alpha, CMYK, 16-bit grayscale)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit samples scaled to 8 bits; convert("L") would clip everything above 255.
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        raise ValueError("floating-point images are not supported: their value range is unknown")
    # Alpha is dropped (not composited), as torchvision's default loader does,
    # so the device sees what the model saw in training.
    return image.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file and return it as 8-bit RGB."""
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


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
    """An RGB PIL image -> float32 [3, crop, crop], normalised."""
    image = center_crop(resize_shorter(_to_rgb(image), spec.resize), spec.crop)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_file(path: str | os.PathLike, spec: InputSpec) -> np.ndarray:
    """An image file -> float32 [3, crop, crop]."""
    return preprocess_image(load_rgb(path), spec)


def preprocess_batch(paths: Iterable[str | os.PathLike], spec: InputSpec) -> np.ndarray:
    """Image files -> float32 [N, 3, crop, crop]."""
    arrays = [preprocess_file(p, spec) for p in paths]
    if not arrays:
        return np.zeros((0, *spec.shape), dtype=np.float32)
    return np.stack(arrays)
