"""TensorRT: the trtexec equivalent and engine naming everywhere; building and running where TensorRT exists."""

from __future__ import annotations

import importlib.util
import json
import shlex

import pytest
from kt_edge_runtime.backends import BackendError
from kt_edge_runtime.backends.tensorrt import Target, engine_path, timing_cache_path, trtexec_command

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="tensorrt not installed")

ORIN = Target(tensorrt="10.3.0", compute_capability=(8, 7), gpu="Orin")
XAVIER = Target(tensorrt="8.5.2", compute_capability=(7, 2), gpu="Xavier")
NEXT = Target(tensorrt="11.1.0", compute_capability=(8, 7), gpu="Orin")


def flags(command: str) -> dict[str, str | None]:
    out = {}
    for token in shlex.split(command)[1:]:
        key, _, value = token.partition("=")
        out[key] = value or None
    return out


def test_engine_names_carry_precision_tensorrt_version_and_gpu(tmp_path):
    assert engine_path(tmp_path, "fp16", ORIN).relative_to(tmp_path).as_posix() == (
        "engines/model.fp16.trt10.3.0.sm87.orin.engine"
    )
    assert engine_path(tmp_path, "int8", XAVIER, dla_core=1).name == "model.int8.trt8.5.2.sm72.xavier.dla1.engine"
    assert timing_cache_path(tmp_path, ORIN).name == "timing.trt10.3.0.sm87.orin.cache"


def test_trtexec_fp32(bundle):
    command = trtexec_command(bundle, "fp32", min_batch=1, opt_batch=4, max_batch=16, workspace_mib=512, target=ORIN)
    f = flags(command)
    assert command.startswith("trtexec ")
    assert f["--onnx"] == str(bundle / "model.fp32.onnx")
    assert f["--saveEngine"] == str(bundle / "engines" / "model.fp32.trt10.3.0.sm87.orin.engine")
    assert f["--minShapes"] == "images:1x3x32x32"
    assert f["--optShapes"] == "images:4x3x32x32"
    assert f["--maxShapes"] == "images:16x3x32x32"
    assert f["--memPoolSize"] == "workspace:512"
    assert f["--timingCacheFile"] == str(bundle / "engines" / "timing.trt10.3.0.sm87.orin.cache")
    assert "--noTF32" in f and "--skipInference" in f
    assert not {"--fp16", "--int8", "--useDLACore", "--allowGPUFallback"} & set(f)


def test_trtexec_reduced_precisions_and_dla(bundle):
    fp16 = flags(trtexec_command(bundle, "fp16", target=ORIN))
    assert "--fp16" in fp16 and "--noTF32" not in fp16 and fp16["--onnx"].endswith("model.fp16.onnx")
    int8 = flags(trtexec_command(bundle, "int8", dla_core=0, target=XAVIER))
    assert {"--int8", "--fp16", "--allowGPUFallback"} <= set(int8) and int8["--useDLACore"] == "0"
    assert int8["--onnx"].endswith("model.int8.onnx") and "--buildOnly" in int8  # TensorRT 8.5 spelling
    assert int8["--saveEngine"].endswith("model.int8.trt8.5.2.sm72.xavier.dla0.engine")


def test_trtexec_tensorrt_11_takes_precision_from_the_onnx(bundle):
    f = flags(trtexec_command(bundle, "int8", target=NEXT))
    assert not {"--int8", "--fp16"} & set(f) and f["--onnx"].endswith("model.int8.onnx")


def test_trtexec_rejects_bad_options(bundle):
    with pytest.raises(ValueError, match="min_batch <= opt_batch"):
        trtexec_command(bundle, "fp32", min_batch=8, opt_batch=4, target=ORIN)
    with pytest.raises(ValueError, match="DLA runs fp16 or int8 only"):
        trtexec_command(bundle, "fp32", dla_core=0, target=ORIN)


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_built_engine_passes_golden_parity(bundle_copy, precision):
    from kt_edge_runtime.backends.tensorrt import build_engine
    from kt_edge_runtime.verify import verify_bundle

    path = build_engine(bundle_copy, precision, min_batch=1, opt_batch=8, max_batch=16, workspace_mib=256)
    assert path.is_file() and path.with_suffix(".json").is_file()
    (report,) = verify_bundle(bundle_copy, backend="tensorrt", precision=precision)
    assert report.passed, report.summary()


@needs_tensorrt
def test_engine_from_another_tensorrt_version_is_refused(bundle_copy):
    from kt_edge_runtime.backends.tensorrt import TrtBackend, build_engine

    path = build_engine(bundle_copy, "fp32", max_batch=4, workspace_mib=256)
    sidecar = path.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**info, "tensorrt": "0.0.1"}))
    with pytest.raises(BackendError, match="built for TensorRT 0.0.1.*rebuild"):
        TrtBackend(path)
