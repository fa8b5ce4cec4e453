"""The training augmentation applied to whole uint8 batches on the device, each image with its own parameters.

torchvision's transforms draw one set of parameters per call, so on a batched tensor every image
would get the same crop and the same jitter. ``BatchAugment`` draws per-image parameters itself and
applies them in a few batched kernels (crop and resize through ``grid_sample``, grouped convolutions
for the blur). It is built from the CPU training transform (``BatchAugment.from_transform``), reading
crop scale, jitter strengths, probabilities, blur kernel and normalisation off the torchvision
objects, so both paths follow one recipe. An image's parameters come from a torch generator seeded
with its key (seed, epoch, index), as on the CPU path: the batch, the rank and the device change
nothing. Pixels stay in float between steps instead of being rounded to uint8 after each one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from kt_edge.data.augment import TwoViews
from kt_edge.errors import DataError

CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_MODES = {
    T.InterpolationMode.BILINEAR: "bilinear",
    T.InterpolationMode.NEAREST: "nearest",
    T.InterpolationMode.BICUBIC: "bicubic",
}


def _column(value: torch.Tensor) -> torch.Tensor:
    return value.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    return GRAY[0] * x[:, 0:1] + GRAY[1] * x[:, 1:2] + GRAY[2] * x[:, 2:3]


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _column(factor)
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def adjust_brightness(x, factor):
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x, factor):
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x, factor):
    return _blend(x, grayscale(x), factor)


def adjust_hue(x, shift):
    """Rotate each image's hue by ``shift`` (a fraction of the colour wheel) in HSV space."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    delta = value - x.min(1).values
    saturation = delta / torch.where(delta == 0, torch.ones_like(value), value)
    d = torch.where(delta == 0, torch.ones_like(delta), delta)
    hue = torch.where(value == r, (g - b) / d, torch.where(value == g, 2 + (b - r) / d, 4 + (r - g) / d))
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1.0
    channels = []
    for n in (5, 3, 1):  # r, g, b: v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6
        k = (n + 6 * hue) % 6
        channels.append(value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(channels, 1)


class ResizedCrop:
    """RandomResizedCrop: torchvision's box sampling (10 tries, then a centre crop), resampled by grid_sample."""

    draws = 2 * CROP_ATTEMPTS + 2

    def __init__(self, size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], mode: str):
        self.size, self.scale, self.ratio, self.mode = tuple(size), tuple(scale), tuple(ratio), mode

    def boxes(self, u: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """(top, left, h, w) per image, in pixels, from its uniforms."""
        tries = u[:, : 2 * CROP_ATTEMPTS]
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * tries[:, 0::2])
        low, high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(low + (high - low) * tries[:, 1::2])
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.uint8).argmax(1, keepdim=True)
        found = ok.any(1)
        fallback_h, fallback_w = self._fallback(height, width)
        h = torch.where(found, h.gather(1, first).squeeze(1), torch.full_like(found, fallback_h, dtype=u.dtype))
        w = torch.where(found, w.gather(1, first).squeeze(1), torch.full_like(found, fallback_w, dtype=u.dtype))
        top = torch.minimum(torch.floor(u[:, -2] * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(u[:, -1] * (width - w + 1)), width - w)
        top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
        return top, left, h, w

    def _fallback(self, height: int, width: int) -> tuple[int, int]:
        ratio = width / height
        if ratio < min(self.ratio):
            return round(width / min(self.ratio)), width
        if ratio > max(self.ratio):
            return height, round(height * max(self.ratio))
        return height, width

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return crop_resize(x, *self.boxes(u, x.shape[-2], x.shape[-1]), self.size, self.mode)


def crop_resize(x: torch.Tensor, top, left, h, w, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Each image's box [top, top+h) x [left, left+w) resampled to ``size``: one affine grid per image."""
    height, width = x.shape[-2:]
    theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [len(x), x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)


class Jitter:
    """ColorJitter inside RandomApply: brightness, contrast, saturation and hue in a random order per image.

    Every adjustment is computed for the whole batch and kept where an image draws it at that position
    (``torch.where``), so the step has no data-dependent shapes and no host synchronisation.
    """

    draws = 1 + 4 + 4  # apply?, four factors, four keys whose ranks give the order
    _adjust = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

    def __init__(self, p: float, ranges: Sequence[tuple[float, float] | None]):
        self.p, self.ranges = p, list(ranges)

    def __call__(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        applied = u[:, 0] < self.p
        order = u[:, 5:9].argsort(dim=1)
        for position in range(4):
            for op, (adjust, bounds) in enumerate(zip(self._adjust, self.ranges)):
                if bounds is None:
                    continue
                factor = bounds[0] + (bounds[1] - bounds[0]) * u[:, 1 + op]
                chosen = applied & (order[:, position] == op)
                x = torch.where(_column(chosen), adjust(x, factor), x)
        return x


class Grayscale:
    draws = 1

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x, u):
        return torch.where(_column(u[:, 0] < self.p), grayscale(x).expand_as(x), x)


class Blur:
    """GaussianBlur inside RandomApply: a separable kernel per image (sigma drawn per image), reflect padding."""

    draws = 2

    def __init__(self, p: float, kernel: tuple[int, int], sigma: tuple[float, float]):
        self.p, self.kernel, self.sigma = p, tuple(kernel), tuple(sigma)

    @staticmethod
    def kernels(size: int, sigma: torch.Tensor) -> torch.Tensor:
        """[B, size] normalised 1-D Gaussians, as torchvision's ``_get_gaussian_kernel1d``."""
        half = (size - 1) * 0.5
        x = torch.linspace(-half, half, size, device=sigma.device, dtype=sigma.dtype)
        pdf = torch.exp(-0.5 * (x[None] / sigma[:, None]) ** 2)
        return pdf / pdf.sum(1, keepdim=True)

    def __call__(self, x, u):
        """Blurs the whole batch and keeps it where drawn: no data-dependent shapes, no host synchronisation."""
        sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, 1]
        return torch.where(_column(u[:, 0] < self.p), gaussian_blur(x, self.kernel, sigma), x)


def gaussian_blur(x: torch.Tensor, kernel: tuple[int, int], sigma: torch.Tensor) -> torch.Tensor:
    """Blur image i with sigma[i]: two grouped convolutions (one channel per group) over the whole batch."""
    b, c, height, width = x.shape
    kx, ky = kernel
    y = F.pad(x, [kx // 2, kx // 2, ky // 2, ky // 2], mode="reflect")
    y = y.reshape(1, b * c, *y.shape[-2:])
    wx = Blur.kernels(kx, sigma).repeat_interleave(c, 0).view(b * c, 1, 1, kx)
    wy = Blur.kernels(ky, sigma).repeat_interleave(c, 0).view(b * c, 1, ky, 1)
    y = F.conv2d(F.conv2d(y, wx, groups=b * c), wy, groups=b * c)
    return y.view(b, c, height, width)


class Flip:
    draws = 1

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x, u):
        return torch.where(_column(u[:, 0] < self.p), x.flip(-1), x)


class Solarize:
    """RandomSolarize: pixels at or above the threshold (on the 0..255 scale) are inverted, with probability p."""

    draws = 1

    def __init__(self, p: float, threshold: float):
        self.p, self.threshold = p, threshold / 255

    def __call__(self, x, u):
        solarized = torch.where(x >= self.threshold, 1 - x, x)
        return torch.where(_column(u[:, 0] < self.p), solarized, x)


class Normalize:
    draws = 0

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)
        self._constants = {}  # (device, dtype) -> (mean, std): made once, not copied to the device each batch

    def __call__(self, x, u):
        key = (x.device, x.dtype)
        if key not in self._constants:
            self._constants[key] = tuple(
                torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1) for v in (self.mean, self.std)
            )
        mean, std = self._constants[key]
        return (x - mean) / std


def _batched(step):
    """The batched counterpart of one torchvision transform of the CPU pipeline."""
    p = 1.0
    if isinstance(step, T.RandomApply) and len(step.transforms) == 1:
        p, step = step.p, step.transforms[0]
    if isinstance(step, T.ColorJitter):
        return Jitter(p, [step.brightness, step.contrast, step.saturation, step.hue])
    if isinstance(step, T.GaussianBlur):
        return Blur(p, step.kernel_size, step.sigma)
    if p == 1.0:
        if isinstance(step, T.RandomResizedCrop) and step.interpolation in _MODES:
            return ResizedCrop(step.size, step.scale, step.ratio, _MODES[step.interpolation])
        if isinstance(step, T.RandomGrayscale):
            return Grayscale(step.p)
        if isinstance(step, T.RandomHorizontalFlip):
            return Flip(step.p)
        if isinstance(step, T.RandomSolarize):
            return Solarize(step.p, step.threshold)
        if isinstance(step, T.Normalize):
            return Normalize(step.mean, step.std)
    raise DataError(f"the training transform step {step!r} has no batched version; set data.augment: per_sample")


class BatchAugment:
    """uint8 images [B, H, W, 3] and per-image uniforms [B, draws] -> normalised float views [B, 3, S, S].

    One list of ops per view: one view (SEED, CompRess), or two (``TwoViews``: MoCo's and SimCLR's
    symmetric pair, BYOL's and Barlow Twins' asymmetric one). ``draws`` counts every view's uniforms.
    """

    def __init__(self, views: list[list]):
        self.view_ops = views
        self.view_draws = [sum(op.draws for op in ops) for ops in views]
        self.draws = sum(self.view_draws)

    @property
    def views(self) -> int:
        return len(self.view_ops)

    @classmethod
    def from_transform(cls, transform) -> BatchAugment:
        """From a method's ``train_transform``: a torchvision Compose, or ``TwoViews`` of two."""
        pipelines = [transform.first, transform.second] if isinstance(transform, TwoViews) else [transform]
        return cls([_ops(pipeline) for pipeline in pipelines])

    def draw(self, keys: Sequence[int]) -> torch.Tensor:
        """[B, draws] float32 uniforms, row i from a generator seeded with ``keys[i]``."""
        out = torch.empty(len(keys), self.draws)
        generator = torch.Generator()
        for row, key in enumerate(keys):
            generator.manual_seed(key)
            out[row] = torch.rand(self.draws, generator=generator)
        return out

    def __call__(self, images: torch.Tensor, uniforms: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float().div_(255)
        uniforms = uniforms.to(x.device)
        views, column = [], 0
        for ops in self.view_ops:
            y = x
            for op in ops:
                y = op(y, uniforms[:, column : column + op.draws])
                column += op.draws
            views.append(y)
        return views[0] if self.views == 1 else tuple(views)


def _ops(transform) -> list:
    steps = transform.transforms if isinstance(transform, T.Compose) else [transform]
    return [_batched(step) for step in steps if not isinstance(step, T.ToTensor)]
