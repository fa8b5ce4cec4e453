"""ONNX Runtime session wrapper: float32 batch in, float32 embeddings out."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import BackendError

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """Names or aliases (cpu, cuda, tensorrt) -> ORT provider names, CPU appended as fallback.

    Asking for a provider this onnxruntime build lacks is an error, not a silent CPU run.
    """
    if not providers:
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    resolved = []
    for name in providers:
        full = _PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise BackendError(
                f"onnxruntime execution provider {full} is not available (available: {', '.join(available)})"
            )
        resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return list(dict.fromkeys(resolved))


@cache
def int8_kernels_saturate() -> bool:
    """True on x86 CPUs without VNNI, where ONNX Runtime's fused int8 kernels (u8s8 via
    vpmaddubsw) can saturate 16-bit intermediate sums and drift far from the Q/DQ graph's arithmetic.
    """
    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686"}:
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return True
    flags = cpuinfo.read_text(errors="replace")
    return "avx512_vnni" not in flags and "avx_vnni" not in flags


class OrtBackend:
    """One InferenceSession with full graph optimisation; any batch size.

    exact_qdq keeps Q/DQ nodes unfused, so an int8 model computes exactly what its
    Q/DQ graph (and TensorRT's int8 engine) defines, at float speed. Default: on only
    where the fused CPU kernels saturate; pass False to time the fused int8 kernels.
    """

    min_batch = 1
    max_batch = None

    def __init__(
        self,
        model_path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        threads: int | None = None,
        exact_qdq: bool | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.exact_qdq = int8_kernels_saturate() if exact_qdq is None else exact_qdq
        if self.exact_qdq:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                os.fspath(model_path), sess_options=options, providers=resolve_providers(providers)
            )
        except BackendError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise BackendError(f"onnxruntime cannot load {model_path}: {exc}") from None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.input_name = input_name or inputs[0]
        self.output_name = output_name or outputs[0]
        if self.input_name not in inputs:
            raise BackendError(f"{model_path} has no input named {self.input_name!r} (has {inputs})")
        if self.output_name not in outputs:
            raise BackendError(f"{model_path} has no output named {self.output_name!r} (has {outputs})")
        self.providers = self.session.get_providers()

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4:
            raise ValueError(f"expected a [N, 3, H, W] batch, got shape {batch.shape}")
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        (out,) = self.session.run([self.output_name], feed)
        return np.asarray(out, dtype=np.float32)
