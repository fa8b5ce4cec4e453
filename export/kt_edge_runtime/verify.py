"""Verify a bundle on this device: hashes first, then golden parity of each model file."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .backends import open_backend, run_batched
from .bundle import Manifest, load_bundle, read_golden
from .parity import DEFAULT_THRESHOLDS, PRECISIONS, ParityReport, golden_parity


def verify_bundle(
    bundle_dir: str | os.PathLike,
    backend: str = "onnxruntime",
    precision: str | None = None,
    providers: Sequence[str] | None = None,
    manifest: Manifest | None = None,
    dla_core: int | None = None,
) -> list[ParityReport]:
    """Golden parity of one precision (or every precision in the bundle) against the PyTorch fp32 outputs.

    The thresholds are the bundle's own (set at export), falling back to the defaults.
    Raises BundleError before running anything if a file or the manifest was modified. A caller that
    already holds the manifest from ``load_bundle`` passes it, so the files are hashed once.
    """
    manifest = manifest or load_bundle(bundle_dir)
    inputs, reference = read_golden(bundle_dir, manifest)
    precisions = [precision] if precision else [p for p in PRECISIONS if p in manifest.models]
    reports = []
    for p in precisions:
        runner = open_backend(bundle_dir, manifest, p, backend, providers, dla_core)
        candidate = run_batched(runner, inputs)
        thresholds = manifest.parity.thresholds.get(p, DEFAULT_THRESHOLDS[p])
        reports.append(golden_parity(reference, candidate, p, thresholds))
    return reports
