"""Latency and throughput of a backend on this device, per batch size."""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .backends import Backend


@dataclass(frozen=True)
class BenchResult:
    """Latency percentiles of one batch size (ms per batch) and images per second at the median."""

    batch: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_ips: float

    def to_dict(self) -> dict:
        return asdict(self)


def machine_name() -> str:
    """This machine for reports: the Jetson board model, else the CPU model, else the platform."""
    board = Path("/proc/device-tree/model")
    if board.is_file():
        return board.read_text(errors="replace").strip("\x00 \n")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def bench(backend: Backend, shape: tuple[int, int, int], batch: int, iters: int = 50, warmup: int = 5) -> BenchResult:
    """Time `iters` runs of one fixed random batch after `warmup` untimed runs."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    for _ in range(warmup):
        backend.run(x)
    times = np.empty(iters)
    for i in range(iters):
        start = time.perf_counter()
        backend.run(x)
        times[i] = time.perf_counter() - start
    p50, p90, p99 = np.percentile(times, [50, 90, 99]) * 1e3
    return BenchResult(batch, iters, float(p50), float(p90), float(p99), float(batch / np.median(times)))
