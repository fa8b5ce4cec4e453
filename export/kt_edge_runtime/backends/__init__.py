"""Inference backends: ONNX Runtime (everywhere) and TensorRT (NVIDIA GPUs, imported lazily)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..bundle import Manifest

BACKENDS = ("onnxruntime", "tensorrt")


class BackendError(RuntimeError):
    """A backend cannot be created or run; the message says which model or engine and why."""


class Backend(Protocol):
    """What verify, embed and bench need from a backend."""

    min_batch: int
    max_batch: int | None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, 3, H, W] -> float32 [N, D]."""
        ...

    def kernels(self, batch: np.ndarray) -> dict:
        """What runs this model here (ops and int8 arithmetic, or the engine), for reports."""
        ...


def open_backend(
    bundle_dir: str | os.PathLike,
    manifest: Manifest,
    precision: str,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    dla_core: int | None = None,
) -> Backend:
    """A ready backend for one precision of a loaded bundle (TensorRT: the engine built for this device,
    on the DLA core given). ONNX Runtime runs full-range int8 weights in its exact (u8u8) mode on x86."""
    entry = manifest.model(precision)
    if backend == "onnxruntime":
        from .onnxruntime import OrtBackend

        if dla_core is not None:
            raise ValueError("--dla-core needs --backend tensorrt")
        return OrtBackend(
            os.path.join(bundle_dir, entry.file),
            providers,
            input_name=entry.input_name,
            output_name=entry.output_name,
            exact_int8=entry.full_range_int8,
        )
    if backend == "tensorrt":
        from .tensorrt import TrtBackend, find_engine

        return TrtBackend(find_engine(bundle_dir, manifest, precision, dla_core))
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def run_batched(backend: Backend, inputs: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run [N, 3, H, W] through a backend in chunks its engine accepts; returns [N, D]."""
    if len(inputs) == 0:
        raise ValueError("run_batched needs at least one input")
    step = min(batch_size, backend.max_batch or batch_size)
    outputs = []
    for start in range(0, len(inputs), step):
        chunk = inputs[start : start + step]
        short = backend.min_batch - len(chunk)
        if short > 0:  # pad a tail smaller than the engine's minimum batch, then drop the padding
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], short, axis=0)])
        outputs.append(backend.run(chunk)[: len(chunk) - max(short, 0)])
    return np.concatenate(outputs)
