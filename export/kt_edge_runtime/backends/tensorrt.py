"""TensorRT engines, built on the device from the bundle's ONNX files, and run with cuda-python.

Engines are not portable across TensorRT versions or GPU models, so each one is
named after the TensorRT version, compute capability and GPU name it was built
for and carries a JSON sidecar; loading it anywhere else is refused. A DLA
engine (Jetson Xavier / Orin) has one fixed batch, as TensorRT requires equal
min/opt/max shapes on DLA, and is picked with the same --dla-core it was built with. `tensorrt` and
`cuda-python` are imported only when an engine is built or run.

Precision: TensorRT 8.5-10 is weakly typed, so fp16 sets the FP16 builder flag
and int8 sets INT8 (+FP16 for the layers left unquantised) and reads the
scales from the Q/DQ nodes of the int8 ONNX file (no calibrator). TensorRT 11
removed those flags: networks are strongly typed and the precision comes from
the ONNX file itself. fp32 clears TF32 so it can meet fp32 parity.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes
from ..bundle import BundleError, Manifest, load_bundle
from . import BackendError

ENGINE_DIR = "engines"
TRTEXEC_FLAGS = {"no_tf32": "--noTF32", "fp16": "--fp16", "int8": "--int8"}  # BuildSpec.flags, as trtexec spells them


class TensorRTMissing(BackendError):
    """TensorRT (or cuda-python) is not installed on this machine."""


def import_tensorrt() -> Any:
    """The tensorrt module, or TensorRTMissing with an install hint."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTMissing(
            "TensorRT is not installed: on Jetson use JetPack's python3-libnvinfer, "
            "elsewhere pip install 'kt-edge-runtime[tensorrt]'"
        ) from None
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's runtime module (new `cuda.bindings` layout first, then the old `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTMissing("cuda-python is not installed: pip install 'kt-edge-runtime[tensorrt]'") from None
    return cudart


def _cuda(result: Any, what: str) -> Any:
    """Unpack a cuda-python (err, *values) tuple, raising on any error."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, msg = cudart.cudaGetErrorString(err)
        raise BackendError(f"CUDA {what} failed: {msg.decode() if isinstance(msg, bytes) else msg}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class Target:
    """What an engine is tied to: TensorRT version, GPU compute capability and GPU model."""

    tensorrt: str
    compute_capability: tuple[int, int]
    gpu: str = ""

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def tag(self) -> str:
        """trt<version>.sm<cc>[.<gpu-name>] for file names; the GPU name lowercased, runs of other chars -> '-'."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        return f"trt{self.tensorrt}.{self.sm}" + (f".{gpu}" if gpu else "")

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} on {self.gpu or 'an unnamed GPU'} ({self.sm})"


def current_target() -> Target:
    """The TensorRT version installed here and the compute capability of the current GPU."""
    trt = import_tensorrt()
    cudart = import_cudart()
    device = _cuda(cudart.cudaGetDevice(), "cudaGetDevice")
    props = _cuda(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return Target(tensorrt=trt.__version__, compute_capability=(props.major, props.minor), gpu=name.strip("\x00 "))


def engine_path(bundle_dir: str | os.PathLike, precision: str, target: Target, dla_core: int | None = None) -> Path:
    """engines/model.<precision>.trt<version>.sm<cc>.<gpu>[.dla<core>].engine inside the bundle."""
    dla = f".dla{dla_core}" if dla_core is not None else ""
    return Path(bundle_dir) / ENGINE_DIR / f"model.{precision}.{target.tag}{dla}.engine"


def timing_cache_path(bundle_dir: str | os.PathLike, target: Target) -> Path:
    """One timing cache per TensorRT version and GPU, shared by all precisions of the bundle."""
    return Path(bundle_dir) / ENGINE_DIR / f"timing.{target.tag}.cache"


@dataclass(frozen=True)
class EngineInfo:
    """The sidecar written next to each engine: what it was built from and for."""

    precision: str
    onnx_file: str
    onnx_sha256: str
    input_name: str
    output_name: str
    tensorrt: str
    compute_capability: tuple[int, int]
    gpu: str
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_mib: int
    dla_core: int | None

    @property
    def target(self) -> Target:
        return Target(self.tensorrt, self.compute_capability, self.gpu)

    @classmethod
    def read(cls, engine: Path) -> EngineInfo:
        """The sidecar of an engine; a missing or malformed one is a BackendError that says to rebuild."""
        sidecar = engine.with_suffix(".json")
        if not sidecar.is_file():
            raise BackendError(f"engine {engine.name} has no sidecar {sidecar.name}: rebuild it with build-engine")
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            data["compute_capability"] = tuple(int(v) for v in data["compute_capability"])
            info = cls(**data)
            ints = [info.min_batch, info.opt_batch, info.max_batch, info.workspace_mib, *info.compute_capability]
            texts = [
                info.precision,
                info.onnx_file,
                info.onnx_sha256,
                info.input_name,
                info.output_name,
                info.tensorrt,
                info.gpu,
            ]
            if (
                not all(isinstance(v, int) and not isinstance(v, bool) for v in ints)
                or not all(isinstance(v, str) for v in texts)
                or not (info.dla_core is None or isinstance(info.dla_core, int))
            ):
                raise TypeError("a field has the wrong type")
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, RecursionError) as exc:
            raise BackendError(
                f"engine sidecar {sidecar.name} is malformed ({exc}): rebuild it with build-engine"
            ) from None
        return info

    def write(self, engine: Path) -> None:
        write_bytes(engine.with_suffix(".json"), (json.dumps(asdict(self), indent=2) + "\n").encode())


@dataclass(frozen=True)
class BuildSpec:
    """What an engine is built from and how: one value that ``build_engine`` hands to TensorRT's Python
    API and ``trtexec_command`` writes as a command line, so the two cannot drift apart."""

    precision: str
    onnx: Path
    engine: Path
    timing_cache: Path
    input_name: str
    output_name: str
    onnx_sha256: str
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max: N x C x H x W
    workspace_mib: int
    dla_core: int | None
    target: Target

    @property
    def tensorrt(self) -> tuple[int, int]:
        return tuple(int(p) for p in self.target.tensorrt.split(".")[:2])  # type: ignore[return-value]

    @property
    def flags(self) -> tuple[str, ...]:
        """Builder flags by precision: fp32 clears TF32; before TensorRT 11 fp16 sets FP16 and int8 sets INT8
        and FP16 (for the layers left float); from 11 on the network is strongly typed and sets none."""
        if self.precision == "fp32":
            return ("no_tf32",)
        if self.tensorrt[0] >= 11:
            return ()
        return ("fp16",) if self.precision == "fp16" else ("int8", "fp16")


def build_spec(
    bundle_dir: str | os.PathLike,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    workspace_mib: int,
    dla_core: int | None,
    target: Target,
    manifest: Manifest,
) -> BuildSpec:
    """The spec of one engine, refusing a profile TensorRT would not build; on DLA all three batches are
    opt_batch (TensorRT requires one fixed shape there)."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if dla_core is not None:
        if dla_core < 0:
            raise ValueError(f"--dla-core must be >= 0, got {dla_core}")
        if precision == "fp32":
            raise ValueError("DLA runs fp16 or int8 only: pick --precision fp16 or int8 with --dla-core")
        min_batch = max_batch = opt_batch
    entry = _tensorrt_model(manifest, precision)
    chw = tuple(manifest.input.shape)
    return BuildSpec(
        precision=precision,
        onnx=Path(bundle_dir) / entry.file,
        engine=engine_path(bundle_dir, precision, target, dla_core),
        timing_cache=timing_cache_path(bundle_dir, target),
        input_name=entry.input_name,
        output_name=entry.output_name,
        onnx_sha256=manifest.files[entry.file].sha256,
        shapes=tuple((n, *chw) for n in (min_batch, opt_batch, max_batch)),  # type: ignore[arg-type]
        workspace_mib=workspace_mib,
        dla_core=dla_core,
        target=target,
    )


def _tensorrt_model(manifest: Manifest, precision: str):
    """The model entry, refusing an int8 file quantized for ONNX Runtime (uint8 activations TensorRT rejects)."""
    entry = manifest.model(precision)
    if entry.int8_target not in (None, "tensorrt"):
        raise BundleError(
            f"{entry.file} was quantized for {entry.int8_target}, not TensorRT: export it with "
            "export.int8.target=tensorrt"
        )
    return entry


def build_engine(
    bundle_dir: str | os.PathLike,
    precision: str,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_mib: int = 1024,
    dla_core: int | None = None,
    manifest: Manifest | None = None,
) -> Path:
    """Build (or rebuild) the engine for one precision from the bundle's verified ONNX file.

    The timing cache in the bundle's engines/ folder is read before and saved
    after the build, so later builds on the same device are fast. A caller holding
    the checked manifest passes it, so the bundle is hashed once.
    """
    manifest = manifest or load_bundle(bundle_dir)
    _tensorrt_model(manifest, precision)  # the bundle is checked before TensorRT is looked for
    trt = import_tensorrt()
    spec = build_spec(
        bundle_dir, precision, min_batch, opt_batch, max_batch, workspace_mib, dla_core, current_target(), manifest
    )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # EXPLICIT_BATCH is required before TensorRT 10 and the default (deprecated flag) from 10 on.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if spec.tensorrt[0] < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(spec.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {spec.onnx.name}: {errors}")

    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_mib << 20)
    else:
        config.max_workspace_size = spec.workspace_mib << 20
    for flag in spec.flags:
        if flag == "no_tf32":
            config.clear_flag(trt.BuilderFlag.TF32)
        else:
            config.set_flag(getattr(trt.BuilderFlag, flag.upper()))

    if spec.dla_core is not None:
        if spec.dla_core >= builder.num_DLA_cores:
            raise BackendError(f"DLA core {spec.dla_core} requested but this device has {builder.num_DLA_cores}")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = spec.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input_name, *spec.shapes)
    config.add_optimization_profile(profile)

    cache_file = spec.timing_cache
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        print(
            f"kt-edge-runtime: timing cache {cache_file.name} does not fit this device: starting a new one",
            file=sys.stderr,
        )
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            raise BackendError("TensorRT refused an empty timing cache")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build a {precision} engine from {spec.onnx.name} (see the log above)")
    write_bytes(spec.engine, bytes(serialized))
    write_bytes(cache_file, bytes(config.get_timing_cache().serialize()))
    (min_batch, *_), (opt_batch, *_), (max_batch, *_) = spec.shapes
    EngineInfo(
        precision=precision,
        onnx_file=spec.onnx.name,
        onnx_sha256=spec.onnx_sha256,
        input_name=spec.input_name,
        output_name=spec.output_name,
        tensorrt=spec.target.tensorrt,
        compute_capability=spec.target.compute_capability,
        gpu=spec.target.gpu,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_mib=spec.workspace_mib,
        dla_core=spec.dla_core,
    ).write(spec.engine)
    return spec.engine


def find_engine(bundle_dir: str | os.PathLike, manifest: Manifest, precision: str, dla_core: int | None = None) -> Path:
    """The engine for this precision built for this very TensorRT, GPU and DLA core (or the GPU when None),
    or a BackendError saying why not."""
    entry = _tensorrt_model(manifest, precision)
    target = current_target()
    path = engine_path(bundle_dir, precision, target, dla_core)
    where = f"DLA core {dla_core}" if dla_core is not None else "the GPU"
    if not path.is_file():
        others = sorted(p.name for p in (Path(bundle_dir) / ENGINE_DIR).glob(f"model.{precision}.*.engine"))
        hint = f" (found only {', '.join(others)})" if others else ""
        dla = f" --dla-core {dla_core}" if dla_core is not None else ""
        raise BackendError(
            f"no {precision} engine for {target.describe()} on {where}{hint}: "
            f"run `kt-edge-runtime build-engine {bundle_dir} --precision {precision}{dla}`"
        )
    info = EngineInfo.read(path)
    if info.onnx_sha256 != manifest.files[entry.file].sha256:
        raise BackendError(f"engine {path.name} was built from another {entry.file}: rebuild it with build-engine")
    return path


class TrtBackend:
    """Runs a serialized engine: host -> device copy, execute_async_v3, device -> host copy."""

    _cudart = None  # set once the CUDA resources exist, so close() is safe after any failed __init__

    def __init__(self, engine_file: str | os.PathLike) -> None:
        self.path = Path(engine_file)
        self.info = EngineInfo.read(self.path)
        trt = import_tensorrt()
        cudart = import_cudart()
        target = current_target()
        if self.info.target != target:
            raise BackendError(
                f"engine {self.path.name} was built for {self.info.target.describe()}; this device has "
                f"{target.describe()}: rebuild it here with build-engine"
            )
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.info.dla_core is not None:
            self._runtime.DLA_core = self.info.dla_core
        try:
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        except Exception:  # TensorRT 10 raises where 8.x returned None
            self.engine = None
        if self.engine is None:
            raise BackendError(f"TensorRT cannot deserialize {self.path.name}: rebuild it with build-engine")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT cannot create an execution context for {self.path.name} (out of memory?)")
        self.input_name, self.output_name = self.info.input_name, self.info.output_name
        self.min_batch, self.max_batch = self.info.min_batch, self.info.max_batch
        if self.engine.get_tensor_dtype(self.input_name) != trt.float32:
            raise BackendError(f"engine {self.path.name} input {self.input_name} is not float32")
        self._out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self._in_ptr = self._out_ptr = None
        self._capacity = 0
        self._out_bytes = 0
        self._stream = _cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._cudart = cudart

    def kernels(self, batch: np.ndarray) -> dict:
        return {
            "engine": self.path.name,
            "target": self.info.target.describe(),
            "dla_core": self.info.dla_core,
            "batch": [self.info.min_batch, self.info.opt_batch, self.info.max_batch],
        }

    def _ensure_buffers(self, in_bytes: int, out_bytes: int) -> None:
        cudart = self._cudart
        if in_bytes > self._capacity:
            if self._in_ptr is not None:
                _cuda(cudart.cudaFree(self._in_ptr), "cudaFree")
            self._in_ptr = _cuda(cudart.cudaMalloc(in_bytes), "cudaMalloc")
            self._capacity = in_bytes
        if out_bytes > self._out_bytes:
            if self._out_ptr is not None:
                _cuda(cudart.cudaFree(self._out_ptr), "cudaFree")
            self._out_ptr = _cuda(cudart.cudaMalloc(out_bytes), "cudaMalloc")
            self._out_bytes = out_bytes

    def run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if batch.ndim != 4 or not self.info.min_batch <= n <= self.info.max_batch:
            raise ValueError(
                f"engine {self.path.name} takes [N, 3, H, W] with {self.info.min_batch} <= N <= "
                f"{self.info.max_batch}, got shape {batch.shape}"
            )
        cudart = self._cudart
        host_in = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.context.set_input_shape(self.input_name, host_in.shape):
            raise BackendError(f"engine {self.path.name} rejects input shape {host_in.shape}")
        host_out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self._out_dtype)
        self._ensure_buffers(host_in.nbytes, host_out.nbytes)
        self.context.set_tensor_address(self.input_name, int(self._in_ptr))
        self.context.set_tensor_address(self.output_name, int(self._out_ptr))
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(cudart.cudaMemcpyAsync(self._in_ptr, host_in.ctypes.data, host_in.nbytes, h2d, self._stream), "copy in")
        if not self.context.execute_async_v3(int(self._stream)):
            raise BackendError(f"TensorRT execution of {self.path.name} failed")
        _cuda(
            cudart.cudaMemcpyAsync(host_out.ctypes.data, self._out_ptr, host_out.nbytes, d2h, self._stream), "copy out"
        )
        _cuda(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host_out.astype(np.float32, copy=False)

    def close(self) -> None:
        """Free device memory and the stream; the backend is unusable afterwards."""
        cudart = self._cudart
        if cudart is None:
            return
        for ptr in (self._in_ptr, self._out_ptr):
            if ptr is not None:
                cudart.cudaFree(ptr)
        cudart.cudaStreamDestroy(self._stream)
        self._in_ptr = self._out_ptr = None
        self._cudart = None

    def __del__(self) -> None:
        self.close()


def trtexec_command(
    bundle_dir: str | os.PathLike,
    precision: str,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_mib: int = 1024,
    dla_core: int | None = None,
    target: Target | None = None,
    manifest: Manifest | None = None,
) -> str:
    """The trtexec command line that builds the same engine as build_engine.

    target defaults to this machine's TensorRT and GPU; pass one to print the
    command for another device.
    """
    manifest = manifest or load_bundle(bundle_dir)
    spec = build_spec(
        bundle_dir,
        precision,
        min_batch,
        opt_batch,
        max_batch,
        workspace_mib,
        dla_core,
        target or current_target(),
        manifest,
    )

    def shape(dims: tuple[int, ...]) -> str:
        return f"{spec.input_name}:{'x'.join(map(str, dims))}"

    lo, opt, hi = spec.shapes
    args = [
        "trtexec",
        f"--onnx={spec.onnx}",
        f"--saveEngine={spec.engine}",
        f"--minShapes={shape(lo)}",
        f"--optShapes={shape(opt)}",
        f"--maxShapes={shape(hi)}",
        f"--memPoolSize=workspace:{spec.workspace_mib}",
        f"--timingCacheFile={spec.timing_cache}",
    ]
    args += [TRTEXEC_FLAGS[flag] for flag in spec.flags]
    if spec.dla_core is not None:
        args += [f"--useDLACore={spec.dla_core}", "--allowGPUFallback"]
    args.append("--skipInference" if spec.tensorrt >= (8, 6) else "--buildOnly")
    return " ".join(shlex.quote(a) for a in args)
