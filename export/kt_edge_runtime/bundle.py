"""The bundle manifest: a versioned schema, validated on read, with file hashes.

A bundle is a directory holding `manifest.json`, the model files and golden
vectors, and `manifest.json.sig` when signed. `load_bundle` refuses a bundle whose
manifest or any listed file changed after `write_manifest` wrote it and, given a
public key, one whose manifest that key did not sign.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .atomic import write_bytes
from .parity import PRECISIONS, Thresholds

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(Exception):
    """A bundle that cannot be trusted or used: the message names the bad field or file."""


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks so big models do not load into memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fail(where: str, what: str) -> BundleError:
    return BundleError(f"manifest field '{where}': {what}")


def _take(data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise _fail(where, f"expected an object, got {type(data).__name__}")
    return dict(data)


def _pop(data: dict, key: str, where: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    path = f"{where}.{key}" if where else key
    if key not in data:
        if default is ...:
            raise _fail(path, "is missing")
        return default
    value = data.pop(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and kind is not bool and (kind is int or kind is float):
        raise _fail(path, f"expected {kind.__name__}, got bool")
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _fail(path, f"expected {names}, got {type(value).__name__}")
    return value


def _no_extra(data: dict, where: str) -> None:
    if data:
        path = f"{where}." if where else ""
        raise _fail(f"{path}{sorted(data)[0]}", f"is not part of schema version {SCHEMA_VERSION}")


def _relpath(value: Any, where: str) -> str:
    """A bundle-relative POSIX path that cannot escape the bundle directory."""
    if not isinstance(value, str) or not value:
        raise _fail(where, "expected a non-empty relative path")
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value or str(p) != value:
        raise _fail(where, f"{value!r} is not a normalised relative path inside the bundle")
    return value


def _floats(value: Any, n: int, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != n:
        raise _fail(where, f"expected a list of {n} numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _fail(where, "expected numbers")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class InputSpec:
    """What the model expects and how to turn an image file into it."""

    shape: tuple[int, int, int]
    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dtype: str = "float32"
    layout: str = "NCHW"
    color: str = "RGB"

    @classmethod
    def from_dict(cls, raw: Any) -> InputSpec:
        w = "input"
        d = _take(raw, w)
        shape = _pop(d, "shape", w, list)
        if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise _fail("input.shape", "expected [3, H, W] with positive integers")
        if shape[0] != 3:
            raise _fail("input.shape", f"expected 3 channels first, got {shape[0]}")
        spec = cls(
            shape=tuple(shape),
            resize=_pop(d, "resize", w, int),
            crop=_pop(d, "crop", w, int),
            mean=_floats(_pop(d, "mean", w, list), 3, "input.mean"),
            std=_floats(_pop(d, "std", w, list), 3, "input.std"),
            dtype=_pop(d, "dtype", w, str, "float32"),
            layout=_pop(d, "layout", w, str, "NCHW"),
            color=_pop(d, "color", w, str, "RGB"),
        )
        _no_extra(d, w)
        if spec.dtype != "float32":
            raise _fail("input.dtype", f"only 'float32' is supported, got {spec.dtype!r}")
        if spec.layout != "NCHW":
            raise _fail("input.layout", f"only 'NCHW' is supported, got {spec.layout!r}")
        if spec.color != "RGB":
            raise _fail("input.color", f"only 'RGB' is supported, got {spec.color!r}")
        if spec.crop <= 0 or spec.resize < spec.crop:
            raise _fail("input.resize", f"need resize >= crop > 0, got resize={spec.resize} crop={spec.crop}")
        if spec.shape[1:] != (spec.crop, spec.crop):
            raise _fail("input.shape", f"H, W {list(spec.shape[1:])} must equal the crop {spec.crop}")
        if any(s <= 0 for s in spec.std):
            raise _fail("input.std", "every std must be > 0")
        return spec

    def to_dict(self) -> dict:
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "layout": self.layout,
            "color": self.color,
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
        }


@dataclass(frozen=True)
class OutputSpec:
    """The embedding the model returns."""

    name: str
    dim: int
    normalized: bool

    @classmethod
    def from_dict(cls, raw: Any) -> OutputSpec:
        d = _take(raw, "output")
        spec = cls(
            name=_pop(d, "name", "output", str),
            dim=_pop(d, "dim", "output", int),
            normalized=_pop(d, "normalized", "output", bool),
        )
        _no_extra(d, "output")
        if spec.dim <= 0:
            raise _fail("output.dim", f"must be > 0, got {spec.dim}")
        return spec

    def to_dict(self) -> dict:
        return {"name": self.name, "dim": self.dim, "normalized": self.normalized}


@dataclass(frozen=True)
class FileEntry:
    """Integrity record of one bundle file."""

    sha256: str
    bytes: int

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> FileEntry:
        d = _take(raw, where)
        entry = cls(sha256=_pop(d, "sha256", where, str), bytes=_pop(d, "bytes", where, int))
        _no_extra(d, where)
        if not _SHA256.match(entry.sha256):
            raise _fail(f"{where}.sha256", "expected 64 lowercase hex digits")
        if entry.bytes < 0:
            raise _fail(f"{where}.bytes", "must be >= 0")
        return entry

    def to_dict(self) -> dict:
        return {"sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class ModelEntry:
    """One model file of a given precision and the names of its graph input/output."""

    file: str
    input_name: str
    output_name: str
    quantization: dict | None = None

    @property
    def int8_target(self) -> str | None:
        """The backend an int8 model was quantized for (tensorrt when unrecorded), None for float models."""
        if self.quantization is None:
            return None
        return str(self.quantization.get("target", "tensorrt"))

    @property
    def full_range_int8(self) -> bool:
        """True when int8 weights may exceed +-64, which x86 u8s8 kernels only run exactly in u8u8 mode."""
        return self.quantization is not None and self.quantization.get("weight_bits", 8) > 7

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> ModelEntry:
        d = _take(raw, where)
        entry = cls(
            file=_relpath(_pop(d, "file", where, str), f"{where}.file"),
            input_name=_pop(d, "input_name", where, str),
            output_name=_pop(d, "output_name", where, str),
            quantization=_pop(d, "quantization", where, (dict, type(None)), None),
        )
        _no_extra(d, where)
        return entry

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"file": self.file, "input_name": self.input_name, "output_name": self.output_name}
        if self.quantization is not None:
            data["quantization"] = self.quantization
        return data


@dataclass(frozen=True)
class Golden:
    """Preprocessed golden inputs [N,3,H,W] and the PyTorch fp32 outputs [N,D] for them."""

    inputs: str
    outputs: str
    images: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> Golden:
        d = _take(raw, "golden")
        images = _pop(d, "images", "golden", (list, type(None)), None)
        golden = cls(
            inputs=_relpath(_pop(d, "inputs", "golden", str), "golden.inputs"),
            outputs=_relpath(_pop(d, "outputs", "golden", str), "golden.outputs"),
            images=None if images is None else tuple(_relpath(p, f"golden.images[{i}]") for i, p in enumerate(images)),
        )
        _no_extra(d, "golden")
        return golden

    def to_dict(self) -> dict:
        data: dict[str, Any] = {"inputs": self.inputs, "outputs": self.outputs}
        if self.images is not None:
            data["images"] = list(self.images)
        return data


@dataclass(frozen=True)
class Parity:
    """Thresholds the bundle is held to, and what was measured at export (per precision)."""

    thresholds: dict[str, Thresholds] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Any) -> Parity:
        d = _take(raw, "parity")
        th_raw = _take(_pop(d, "thresholds", "parity", dict, {}), "parity.thresholds")
        res_raw = _take(_pop(d, "results", "parity", dict, {}), "parity.results")
        _no_extra(d, "parity")
        thresholds = {}
        for precision, value in th_raw.items():
            where = f"parity.thresholds.{precision}"
            if precision not in PRECISIONS:
                raise _fail(where, f"unknown precision; expected one of {', '.join(PRECISIONS)}")
            try:
                thresholds[precision] = Thresholds.from_dict(_take(value, where))
            except ValueError as exc:
                raise _fail(where, str(exc)) from None
        for precision, value in res_raw.items():
            where = f"parity.results.{precision}"
            if precision not in PRECISIONS:
                raise _fail(where, f"unknown precision; expected one of {', '.join(PRECISIONS)}")
            _take(value, where)
        return cls(thresholds=thresholds, results=res_raw)

    def to_dict(self) -> dict:
        return {
            "thresholds": {p: t.to_dict() for p, t in self.thresholds.items()},
            "results": self.results,
        }


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to know about a bundle."""

    architecture: str
    input: InputSpec
    output: OutputSpec
    models: dict[str, ModelEntry]
    golden: Golden
    files: dict[str, FileEntry] = field(default_factory=dict)
    parity: Parity = field(default_factory=Parity)
    provenance: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    created: str = ""
    kt_edge_version: str = ""
    schema_version: int = SCHEMA_VERSION

    def model(self, precision: str) -> ModelEntry:
        """The model entry for a precision, or a BundleError listing the ones present."""
        if precision not in self.models:
            have = ", ".join(sorted(self.models)) or "none"
            raise BundleError(f"bundle has no {precision} model (has: {have})")
        return self.models[precision]

    def referenced_files(self) -> list[str]:
        """Every bundle-relative path the manifest points at, in a stable order."""
        paths = [m.file for _, m in sorted(self.models.items())]
        paths += [self.golden.inputs, self.golden.outputs, *(self.golden.images or ())]
        return list(dict.fromkeys(paths))

    @classmethod
    def from_dict(cls, raw: Any) -> Manifest:
        d = _take(raw, "manifest")
        d.pop("digest", None)
        version = _pop(d, "schema_version", "", int)
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema_version {version} is newer than this runtime supports "
                f"({SCHEMA_VERSION}); upgrade kt-edge-runtime"
            )
        if version < SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema_version {version} is older than this runtime supports ({SCHEMA_VERSION}): "
                "export the bundle again with this kt-edge"
            )
        models_raw = _take(_pop(d, "models", "", dict), "models")
        if not models_raw:
            raise _fail("models", "needs at least one model")
        models = {}
        for precision, value in models_raw.items():
            if precision not in PRECISIONS:
                raise _fail(f"models.{precision}", f"unknown precision; expected one of {', '.join(PRECISIONS)}")
            models[precision] = ModelEntry.from_dict(value, f"models.{precision}")
        files_raw = _take(_pop(d, "files", "", dict, {}), "files")
        files = {_relpath(p, f"files.{p}"): FileEntry.from_dict(v, f"files.{p}") for p, v in files_raw.items()}
        manifest = cls(
            architecture=_pop(d, "architecture", "", str),
            input=InputSpec.from_dict(_pop(d, "input", "", dict)),
            output=OutputSpec.from_dict(_pop(d, "output", "", dict)),
            models=models,
            golden=Golden.from_dict(_pop(d, "golden", "", dict)),
            files=files,
            parity=Parity.from_dict(_pop(d, "parity", "", dict, {})),
            provenance=_pop(d, "provenance", "", dict, {}),
            verified=_pop(d, "verified", "", bool, False),
            created=_pop(d, "created", "", str, ""),
            kt_edge_version=_pop(d, "kt_edge_version", "", str, ""),
            schema_version=version,
        )
        _no_extra(d, "")
        if not manifest.architecture:
            raise _fail("architecture", "must not be empty")
        return manifest

    def to_dict(self) -> dict:
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "architecture": self.architecture,
            "input": self.input.to_dict(),
            "output": self.output.to_dict(),
            "models": {p: m.to_dict() for p, m in self.models.items()},
            "golden": self.golden.to_dict(),
            "files": {p: f.to_dict() for p, f in sorted(self.files.items())},
            "parity": self.parity.to_dict(),
            "provenance": self.provenance,
            "verified": self.verified,
            "created": self.created,
            "kt_edge_version": self.kt_edge_version,
        }
        return data


def _digest(data: dict) -> str:
    """sha256 of the canonical JSON of a manifest dict without its own digest."""
    body = {k: v for k, v in data.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def write_manifest(
    bundle_dir: str | os.PathLike, manifest: Manifest, extra_files: list[str] | tuple[str, ...] = ()
) -> Manifest:
    """Hash every referenced file (plus extra_files and those already listed) and write manifest.json atomically.

    Returns the manifest with its `files` filled in, exactly as written.
    """
    root = Path(bundle_dir)
    paths = dict.fromkeys([*manifest.referenced_files(), *manifest.files, *extra_files])
    files = {}
    for rel in paths:
        rel = _relpath(rel, f"files.{rel}")
        full = root / rel
        if not full.is_file():
            raise BundleError(f"bundle file {rel} does not exist in {root}")
        files[rel] = FileEntry(sha256=sha256_file(full), bytes=full.stat().st_size)
    manifest = replace(manifest, files=files)
    data = manifest.to_dict()
    data["digest"] = _digest(data)
    write_bytes(root / MANIFEST_NAME, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    return manifest


def load_bundle(bundle_dir: str | os.PathLike, public_key: str | os.PathLike | None = None) -> Manifest:
    """Read, validate and integrity-check a bundle; a BundleError names what is wrong.

    Given a public key, the manifest must carry a valid Ed25519 signature by it (checked first).
    """
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path} not found: not a bundle directory")
    raw = path.read_bytes()
    if public_key is not None:
        from .signing import SignatureError, check_signature

        try:
            check_signature(root, raw, public_key)
        except SignatureError as exc:
            raise BundleError(str(exc)) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{MANIFEST_NAME} must hold a JSON object")
    manifest = Manifest.from_dict(data)
    if data.get("digest") != _digest(data):
        raise BundleError(f"{MANIFEST_NAME} was modified after it was written (digest mismatch)")
    for rel in manifest.referenced_files():
        if rel not in manifest.files:
            raise BundleError(f"{MANIFEST_NAME} references {rel} but does not list its sha256 under 'files'")
    for rel, entry in manifest.files.items():
        full = root / rel
        if not full.is_file():
            raise BundleError(f"bundle file {rel} is missing")
        size = full.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"bundle file {rel} has {size} bytes, manifest says {entry.bytes}: file was modified")
        if sha256_file(full) != entry.sha256:
            raise BundleError(f"bundle file {rel} does not match its sha256 in {MANIFEST_NAME}: file was modified")
    return manifest


def check_verified(manifest: Manifest, allow_unverified: bool = False) -> None:
    """Refuse a bundle whose export parity failed, naming the failed checks, unless explicitly allowed."""
    if manifest.verified or allow_unverified:
        return
    failed = []
    for precision, result in sorted(manifest.parity.results.items()):
        for check, report in sorted(result.items()):
            if isinstance(report, dict) and report.get("passed") is False:
                why = report.get("failures") or []
                failed.append(f"{precision} {check}" + (f" ({'; '.join(map(str, why))})" if why else ""))
    raise BundleError(
        f"bundle is not verified: export parity failed ({', '.join(failed) or 'no passing results recorded'}); "
        "pass --allow-unverified to use it anyway"
    )


def read_golden(bundle_dir: str | os.PathLike, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """Golden inputs [N,3,H,W] and reference outputs [N,D], checked against the manifest's shapes."""
    root = Path(bundle_dir)
    inputs = np.load(root / manifest.golden.inputs, allow_pickle=False)
    outputs = np.load(root / manifest.golden.outputs, allow_pickle=False)
    if inputs.dtype != np.float32 or inputs.ndim != 4 or inputs.shape[1:] != manifest.input.shape:
        raise BundleError(
            f"golden inputs {manifest.golden.inputs} must be float32 [N, {', '.join(map(str, manifest.input.shape))}],"
            f" got {inputs.dtype} {list(inputs.shape)}"
        )
    if outputs.dtype != np.float32 or outputs.shape != (len(inputs), manifest.output.dim):
        raise BundleError(
            f"golden outputs {manifest.golden.outputs} must be float32 [{len(inputs)}, {manifest.output.dim}],"
            f" got {outputs.dtype} {list(outputs.shape)}"
        )
    return inputs, outputs
