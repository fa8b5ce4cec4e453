"""ONNX Runtime session wrapper: float32 batch in, float32 embeddings out."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
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


def cpu_features() -> list[str]:
    """The CPU's int8 dot-product extensions that decide ONNX Runtime's int8 kernels (MLAS), from /proc/cpuinfo."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="replace") if cpuinfo.is_file() else ""
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm", "sve")
    return [f for f in wanted if f in flags]


def int8_kernels(ops: dict[str, int], exact_int8: bool) -> str:
    """Which int8 arithmetic the optimised graph runs on this CPU, in words, from the op types that ran."""
    fused = sorted(op for op in ops if op.startswith("QLinear") or op in ("QGemm", "ConvInteger", "MatMulInteger"))
    if not fused:
        return "unfused Q/DQ: int8 emulated with float kernels" if "DequantizeLinear" in ops else "no int8 kernels"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        if exact_int8:
            kind = "u8s8 where every weight is within +-64 (no 16-bit saturation), u8u8 elsewhere (exact, slower)"
        elif any(f in cpu_features() for f in ("avx512_vnni", "avx_vnni", "amx_int8")):
            kind = "u8s8 with VNNI (32-bit sums, exact)"
        else:
            kind = "u8s8 without VNNI (16-bit pair sums, exact only for weights within +-64)"
    else:
        kind = f"{machine} int8 dot products (32-bit sums, exact)"
    return f"fused int8 kernels ({', '.join(fused)}): {kind}"


class OrtBackend:
    """One InferenceSession with full graph optimisation; any batch size.

    exact_int8 sets ONNX Runtime's ``session.x64quantprecision``: on x86 CPUs its fused u8s8
    kernels sum pairs of products in saturating 16 bits, which int8 weights beyond +-64 can
    overflow; with it those weights run through u8u8 kernels instead, exactly but slower.
    Models quantized with 7-bit weights (the onnxruntime int8 target) need it off to stay fast.
    It changes nothing for float models or on other CPUs.
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
        exact_int8: bool = True,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.exact_int8 = exact_int8
        self._threads = threads
        self._providers = resolve_providers(providers)
        self.session = self._session()
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.input_name = input_name or inputs[0]
        self.output_name = output_name or outputs[0]
        if self.input_name not in inputs:
            raise BackendError(f"{model_path} has no input named {self.input_name!r} (has {inputs})")
        if self.output_name not in outputs:
            raise BackendError(f"{model_path} has no output named {self.output_name!r} (has {outputs})")
        self.providers = self.session.get_providers()

    def _session(self, profile: bool = False) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.exact_int8:
            options.add_session_config_entry("session.x64quantprecision", "1")
        if self._threads is not None:
            options.intra_op_num_threads = self._threads
        if profile:
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="kt-edge-profile-"), "ort")
        try:
            return ort.InferenceSession(self.model_path, sess_options=options, providers=self._providers)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise BackendError(f"onnxruntime cannot load {self.model_path}: {exc}") from None

    def kernels(self, batch: np.ndarray) -> dict:
        """What ran for one batch (after one warm-up run), from ONNX Runtime's own profiler: node count and
        milliseconds per op type, providers, and the int8 arithmetic that means on this CPU."""
        session = self._session(profile=True)
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        for _ in range(2):
            session.run([self.output_name], feed)
        trace = Path(session.end_profiling())
        events = json.loads(trace.read_text())
        shutil.rmtree(trace.parent, ignore_errors=True)
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        last = runs[-1]["ts"] if runs else 0
        ops: dict[str, int] = {}
        ms: dict[str, float] = {}
        providers: dict[str, int] = {}
        for event in events:
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and event["ts"] >= last:
                args = event.get("args", {})
                op, provider = args.get("op_name", "?"), args.get("provider", "?")
                ops[op] = ops.get(op, 0) + 1
                ms[op] = ms.get(op, 0.0) + event.get("dur", 0) / 1000.0
                providers[provider] = providers.get(provider, 0) + 1
        return {
            "ops": dict(sorted(ops.items())),
            "op_ms": {op: round(t, 3) for op, t in sorted(ms.items(), key=lambda kv: -kv[1])},
            "providers": providers,
            "int8": int8_kernels(ops, self.exact_int8),
            "cpu_features": cpu_features(),
            "x64quantprecision": self.exact_int8,
        }

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4:
            raise ValueError(f"expected a [N, 3, H, W] batch, got shape {batch.shape}")
        feed = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
        (out,) = self.session.run([self.output_name], feed)
        return np.asarray(out, dtype=np.float32)
