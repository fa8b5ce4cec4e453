"""The TensorRT code paths that need no GPU to be wrong, run against a stand-in `tensorrt` and `cuda` module.

The stand-in records what build_engine asks of TensorRT's API (profiles, flags, timing cache) and lets a
test make deserialisation or the timing cache fail. Real builds run in test_tensorrt.py where TensorRT is.
"""

from __future__ import annotations

import gc
import json
import sys
import types
from pathlib import Path

import pytest
from kt_edge_runtime.backends import BackendError, open_backend
from kt_edge_runtime.bundle import BundleError, load_bundle
from kt_edge_runtime.cli import main


class FakeTensorRT(types.ModuleType):
    """Just enough of tensorrt's Python API for build_engine, find_engine and TrtBackend.__init__."""

    def __init__(self, version: str = "10.3.0") -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.profiles: list[tuple] = []
        self.flags: set[str] = set()
        self.cache_accepts = [True]  # what each set_timing_cache call returns, last one repeated
        self.deserializes = True
        self.dla_cores = 2
        trt = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                trt.profiles.append((lo[0], opt[0], hi[0]))

        class Cache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            default_device_type = None
            DLA_core = None

            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                trt.flags.add(flag)

            def clear_flag(self, flag):
                trt.flags.discard(flag)

            def create_timing_cache(self, data):
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return trt.cache_accepts.pop(0) if len(trt.cache_accepts) > 1 else trt.cache_accepts[0]

            def get_timing_cache(self):
                return Cache()

            def add_optimization_profile(self, profile):
                pass

        class Builder:
            def __init__(self, logger):
                self.num_DLA_cores = trt.dla_cores

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized-engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                return True

        class Runtime:
            DLA_core = None

            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                if not trt.deserializes:
                    return None
                raise AssertionError("tests here stop before a real engine would run")

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(TF32="tf32", FP16="fp16", INT8="int8", GPU_FALLBACK="gpu-fallback")
        self.DeviceType = types.SimpleNamespace(DLA="dla", GPU="gpu")


def fake_cudart(gpu: bytes = b"Orin", cc: tuple[int, int] = (8, 7)) -> types.ModuleType:
    cudart = types.ModuleType("cuda.bindings.runtime")
    success = "success"
    cudart.cudaError_t = types.SimpleNamespace(cudaSuccess=success)
    cudart.cudaGetDevice = lambda: (success, 0)
    cudart.cudaGetDeviceProperties = lambda device: (success, types.SimpleNamespace(name=gpu, major=cc[0], minor=cc[1]))
    cudart.cudaGetErrorString = lambda err: (success, b"fake error")
    return cudart


@pytest.fixture
def trt(monkeypatch):
    module = FakeTensorRT()
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    runtime = fake_cudart()
    cuda.bindings, bindings.runtime = bindings, runtime
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    return module


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_dla_engine_has_one_fixed_batch_and_is_found_with_its_core(trt, bundle_copy):
    from kt_edge_runtime.backends.tensorrt import EngineInfo, build_engine, find_engine

    path = build_engine(bundle_copy, "fp16", min_batch=1, opt_batch=8, max_batch=32, dla_core=1)
    assert trt.profiles == [(8, 8, 8)]  # TensorRT: DLA needs min = opt = max
    assert path.name == "model.fp16.trt10.3.0.sm87.orin.dla1.engine"
    info = EngineInfo.read(path)
    assert (info.min_batch, info.opt_batch, info.max_batch, info.dla_core) == (8, 8, 8, 1)
    manifest = load_bundle(bundle_copy)
    assert find_engine(bundle_copy, manifest, "fp16", dla_core=1) == path
    with pytest.raises(BackendError, match=r"on the GPU \(found only model.fp16.*dla1.engine\)"):
        find_engine(bundle_copy, manifest, "fp16")
    build_engine(bundle_copy, "fp16", max_batch=16)
    assert trt.profiles[-1] == (1, 8, 16)
    with pytest.raises(BackendError, match="DLA core 2 requested but this device has 2"):
        build_engine(bundle_copy, "int8", dla_core=2)


def test_verify_embed_and_bench_take_dla_core(trt, bundle_copy, tmp_path, capsys):
    for args in (
        ["verify", bundle_copy],
        ["bench", bundle_copy],
        ["embed", bundle_copy, bundle_copy / "golden" / "images", "-o", tmp_path / "e.npy"],
    ):
        assert main([*map(str, args), "--backend", "tensorrt", "--precision", "fp16", "--dla-core", "0"]) == 2
        line = one_error_line(capsys)
        assert "no fp16 engine for TensorRT 10.3.0 on Orin (sm87) on DLA core 0" in line
        assert "build-engine" in line and "--dla-core 0" in line


def test_engine_from_another_gpu_model_with_the_same_compute_capability_is_refused(trt, bundle_copy):
    from kt_edge_runtime.backends.tensorrt import TrtBackend, build_engine

    path = build_engine(bundle_copy, "fp32")
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "gpu": "Orin Nano"}))
    with pytest.raises(
        BackendError,
        match=r"built for TensorRT 10.3.0 on Orin Nano \(sm87\); this device has "
        r"TensorRT 10.3.0 on Orin \(sm87\)",
    ):
        TrtBackend(path)


def test_rejected_timing_cache_is_replaced_with_a_note(trt, bundle_copy, capsys):
    from kt_edge_runtime.backends.tensorrt import build_engine

    trt.cache_accepts = [False, True]
    assert build_engine(bundle_copy, "fp32").is_file()
    assert "does not fit this device: starting a new one" in one_error_line(capsys)
    trt.cache_accepts = [False]
    with pytest.raises(BackendError, match="refused an empty timing cache"):
        build_engine(bundle_copy, "fp32")


def test_failed_deserialisation_is_one_line_and_exit_2(trt, bundle_copy, capsys):
    from kt_edge_runtime.backends.tensorrt import build_engine

    build_engine(bundle_copy, "fp16")
    trt.deserializes = False
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        assert main(["verify", str(bundle_copy), "--backend", "tensorrt", "--precision", "fp16"]) == 2
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert "TensorRT cannot deserialize model.fp16" in one_error_line(capsys)
    assert not unraisable  # no exception from TrtBackend.__del__ after the error


@pytest.mark.parametrize("sidecar", ["not json", "[]", '{"precision": "fp16"}', "BROKEN"])
def test_malformed_engine_sidecar_is_one_line_and_exit_2(trt, bundle_copy, capsys, sidecar):
    from kt_edge_runtime.backends.tensorrt import build_engine

    path = build_engine(bundle_copy, "fp16").with_suffix(".json")
    if sidecar == "BROKEN":  # every field present, one of the wrong type
        sidecar = json.dumps({**json.loads(path.read_text()), "max_batch": "32"})
    path.write_text(sidecar)
    assert main(["verify", str(bundle_copy), "--backend", "tensorrt", "--precision", "fp16"]) == 2
    line = one_error_line(capsys)
    assert "sidecar" in line and "rebuild it with build-engine" in line


def test_int8_quantized_for_onnxruntime_is_refused_by_tensorrt(trt, bundle_copy, calibration):
    from kt_edge_runtime.backends.tensorrt import build_engine
    from kt_edge_runtime.bundle import Manifest, write_manifest

    from kt_edge.export.quantize import to_int8

    with pytest.warns(UserWarning):
        record = to_int8(
            bundle_copy / "model.fp32.onnx", bundle_copy / "model.int8.onnx", calibration, target="onnxruntime"
        )
    data = json.loads((bundle_copy / "manifest.json").read_text())
    data["models"]["int8"]["quantization"] = record
    write_manifest(bundle_copy, Manifest.from_dict(data))
    with pytest.raises(BundleError, match="quantized for onnxruntime, not TensorRT.*export.int8.target=tensorrt"):
        build_engine(bundle_copy, "int8")
    manifest = load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="quantized for onnxruntime"):
        open_backend(bundle_copy, manifest, "int8", "tensorrt")
    assert not open_backend(bundle_copy, manifest, "int8").exact_int8  # 7-bit weights: the fast kernels


def test_build_engine_checks_the_bundle_before_tensorrt(bundle_copy, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    (bundle_copy / "golden" / "outputs.npy").write_bytes(b"changed")
    assert main(["build-engine", str(bundle_copy), "--precision", "fp16"]) == 2
    line = one_error_line(capsys)
    assert "golden/outputs.npy" in line and "TensorRT" not in line
    assert Path(bundle_copy / "engines").exists() is False


@pytest.mark.parametrize(
    "precision, batches, dla_core, builder_flags, trtexec_flags",
    [
        ("fp32", (1, 4, 16), None, set(), {"--noTF32"}),
        ("int8", (2, 8, 32), None, {"int8", "fp16"}, {"--int8", "--fp16"}),
        ("fp16", (1, 8, 32), 1, {"fp16", "gpu-fallback"}, {"--fp16", "--useDLACore=1", "--allowGPUFallback"}),
    ],
)
def test_build_engine_and_trtexec_build_the_same_engine(
    trt, bundle_copy, precision, batches, dla_core, builder_flags, trtexec_flags
):
    from kt_edge_runtime.backends.tensorrt import build_engine, trtexec_command

    lo, opt, hi = batches
    args = dict(min_batch=lo, opt_batch=opt, max_batch=hi, workspace_mib=512, dla_core=dla_core)
    path = build_engine(bundle_copy, precision, **args)
    command = trtexec_command(bundle_copy, precision, **args).split()
    options = dict(a[2:].split("=", 1) for a in command if "=" in a)
    shapes = [int(options[f"{k}Shapes"].split(":")[1].split("x")[0]) for k in ("min", "opt", "max")]
    assert trt.profiles == [tuple(shapes)]  # DLA: both fixed at opt
    assert trt.flags == builder_flags and trtexec_flags <= set(command)
    assert not {a for a in command if a in ("--fp16", "--int8", "--noTF32")} - trtexec_flags
    assert options["saveEngine"] == str(path) and options["memPoolSize"] == "workspace:512"
