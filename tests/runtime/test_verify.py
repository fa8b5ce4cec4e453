"""verify_bundle on a real exported ResNet-18: golden parity per precision on ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from kt_edge_runtime.backends.onnxruntime import OrtBackend
from kt_edge_runtime.bundle import MANIFEST_NAME, BundleError, Manifest, load_bundle, read_golden, write_manifest
from kt_edge_runtime.verify import verify_bundle


def test_every_precision_passes_golden_parity(bundle):
    reports = {r.precision: r for r in verify_bundle(bundle)}
    assert set(reports) == {"fp32", "fp16", "int8"}
    for report in reports.values():
        assert report.passed, report.summary()
        assert report.samples == 16
    assert reports["fp32"].max_abs_err < 1e-4
    # lower precisions really are lower precision: they must differ from fp32
    assert reports["fp16"].max_abs_err > reports["fp32"].max_abs_err
    assert reports["int8"].min_cosine < reports["fp16"].min_cosine


def test_one_precision_only(bundle):
    (report,) = verify_bundle(bundle, precision="fp16")
    assert report.precision == "fp16" and report.passed


def test_full_range_int8_is_verified_on_exact_kernels(bundle):
    """The TensorRT-target int8 model (weights beyond +-64) is checked in ONNX Runtime's exact u8u8 mode."""
    manifest = load_bundle(bundle)
    assert manifest.models["int8"].full_range_int8
    x, y = read_golden(bundle, manifest)
    exact = OrtBackend(bundle / "model.int8.onnx", exact_int8=True).run(x)
    (report,) = verify_bundle(bundle, precision="int8")
    cos = np.sum(exact * y, 1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(y, axis=1)
    assert report.min_cosine == pytest.approx(cos.min(), abs=1e-6)


def exported_manifest(bundle_dir) -> Manifest:
    """The manifest as written, parsed without re-checking file hashes."""
    return Manifest.from_dict(json.loads((bundle_dir / MANIFEST_NAME).read_text()))


def scale_initializer(path, name_part: str, factor: float) -> str:
    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if name_part in t.name and len(t.dims) == 4]
    target = weights[-1]
    array = onnx.numpy_helper.to_array(target) * np.float32(factor)
    target.CopyFrom(onnx.numpy_helper.from_array(array, target.name))
    onnx.save(model, str(path))
    return target.name


def test_perturbed_model_fails_fp32_naming_the_worst_sample(bundle_copy):
    scale_initializer(bundle_copy / "model.fp32.onnx", "", 1.01)
    write_manifest(bundle_copy, exported_manifest(bundle_copy))  # re-hashed: a bad export, not tampering
    (report,) = verify_bundle(bundle_copy, precision="fp32")
    assert not report.passed

    x, y = read_golden(bundle_copy, load_bundle(bundle_copy))
    out = OrtBackend(bundle_copy / "model.fp32.onnx").run(x)
    violation = (np.abs(out - y) / (1e-5 + 1e-3 * np.abs(y))).max(axis=1)
    assert report.worst_sample == int(np.argmax(violation))
    assert f"worst sample {report.worst_sample}" in report.summary()


def test_tampered_model_is_refused_before_running(bundle_copy):
    scale_initializer(bundle_copy / "model.fp32.onnx", "", 1.01)
    with pytest.raises(BundleError, match="model.fp32.onnx"):
        verify_bundle(bundle_copy)
