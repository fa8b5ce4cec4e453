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
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from .atomic import write_bytes
from .parity import PRECISIONS, Thresholds

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"

_SHA256 = re.compile(r"[0-9a-f]{64}")


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


# --------------------------------------------------------------------------- readers of one JSON value
# A reader takes (value, where) and returns the value as the dataclass holds it, or raises a BundleError
# naming the field. Each dataclass field names its reader (``_field``); ``_Schema`` walks the fields, so a
# field is declared once and read, checked and written from that declaration.

Read = Callable[[Any, str], Any]


def _take(data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise _fail(where, f"expected an object, got {type(data).__name__}")
    return dict(data)


def _is(kind: type) -> Read:
    """A JSON value of one type; an integer is a float too, a boolean is never a number."""

    def read(value: Any, where: str) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind in (int, float):
            raise _fail(where, f"expected {kind.__name__}, got bool")
        if not isinstance(value, kind):
            raise _fail(where, f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return read


def _optional(read: Read) -> Read:
    return lambda value, where: None if value is None else read(value, where)


def _relpath(value: Any, where: str) -> str:
    """A bundle-relative POSIX path that cannot escape the bundle directory."""
    if not isinstance(value, str) or not value:
        raise _fail(where, "expected a non-empty relative path")
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value or str(p) != value:
        raise _fail(where, f"{value!r} is not a normalised relative path inside the bundle")
    return value


def _paths(value: Any, where: str) -> tuple[str, ...]:
    return tuple(_relpath(p, f"{where}[{i}]") for i, p in enumerate(_is(list)(value, where)))


def _floats(n: int) -> Read:
    def read(value: Any, where: str) -> tuple[float, ...]:
        if not isinstance(value, list) or len(value) != n:
            raise _fail(where, f"expected a list of {n} numbers")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise _fail(where, "expected numbers")
        return tuple(float(v) for v in value)

    return read


def _shape(value: Any, where: str) -> tuple[int, int, int]:
    shape = _is(list)(value, where)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise _fail(where, "expected [3, H, W] with positive integers")
    if shape[0] != 3:
        raise _fail(where, f"expected 3 channels first, got {shape[0]}")
    return tuple(shape)


def _precision(key: str, where: str) -> str:
    if key not in PRECISIONS:
        raise _fail(where, f"unknown precision; expected one of {', '.join(PRECISIONS)}")
    return key


def _table(read_key: Read, read_value: Read) -> Read:
    """A JSON object whose keys and values are each read (a precision and its model, a path and its hash)."""

    def read(value: Any, where: str) -> dict:
        return {read_key(k, f"{where}.{k}"): read_value(v, f"{where}.{k}") for k, v in _take(value, where).items()}

    return read


def _thresholds(value: Any, where: str) -> Thresholds:
    try:
        return Thresholds.from_dict(_take(value, where))
    except ValueError as exc:
        raise _fail(where, str(exc)) from None


def _checked(read: Read, ok: Callable[[Any], bool], what: str) -> Read:
    """``read``, then refuse a value ``ok`` turns down, saying ``what`` it must be."""

    def checked(value: Any, where: str) -> Any:
        value = read(value, where)
        if not ok(value):
            raise _fail(where, what.format(value=value))
        return value

    return checked


def _only(allowed: str) -> Read:
    return _checked(_is(str), lambda v: v == allowed, f"only {allowed!r} is supported, got {{value!r}}")


def _nested(cls: type) -> Read:
    return lambda value, where: cls.from_dict(value, where)


def _field(read: Read, default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A dataclass field with the reader of its JSON value (a default makes it optional in the JSON too)."""
    return field(default=default, default_factory=factory, metadata={"read": read})


def _plain(value: Any) -> Any:
    """A field's value as JSON holds it."""
    if isinstance(value, (_Schema, Thresholds)):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class _Schema:
    """Read and written from the dataclass fields: every key is checked by its field's reader, a missing key
    without a default and an unknown key are refused, and None is left out when written."""

    WHERE = ""  # the manifest key this part sits under

    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None):
        where = cls.WHERE if where is None else where
        data, values = _take(raw, where), {}
        for f in fields(cls):
            path = f"{where}.{f.name}" if where else f.name
            if f.name in data:
                values[f.name] = f.metadata["read"](data.pop(f.name), path)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise _fail(path, "is missing")
        if data:
            extra = f"{where}.{sorted(data)[0]}" if where else sorted(data)[0]
            raise _fail(extra, f"is not part of schema version {SCHEMA_VERSION}")
        part = cls(**values)
        part.check()
        return part

    def check(self) -> None:
        """What no single field can say alone (resize >= crop)."""

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: _plain(value) for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class InputSpec(_Schema):
    """What the model expects and how to turn an image file into it."""

    WHERE = "input"

    shape: tuple[int, int, int] = _field(_shape)
    resize: int = _field(_is(int))
    crop: int = _field(_is(int))
    mean: tuple[float, float, float] = _field(_floats(3))
    std: tuple[float, float, float] = _field(_checked(_floats(3), lambda v: min(v) > 0, "every std must be > 0"))
    dtype: str = _field(_only("float32"), "float32")
    layout: str = _field(_only("NCHW"), "NCHW")
    color: str = _field(_only("RGB"), "RGB")

    def check(self) -> None:
        if self.crop <= 0 or self.resize < self.crop:
            raise _fail("input.resize", f"need resize >= crop > 0, got resize={self.resize} crop={self.crop}")
        if self.shape[1:] != (self.crop, self.crop):
            raise _fail("input.shape", f"H, W {list(self.shape[1:])} must equal the crop {self.crop}")


@dataclass(frozen=True)
class OutputSpec(_Schema):
    """The embedding the model returns."""

    WHERE = "output"

    name: str = _field(_is(str))
    dim: int = _field(_checked(_is(int), lambda v: v > 0, "must be > 0, got {value}"))
    normalized: bool = _field(_is(bool))


@dataclass(frozen=True)
class FileEntry(_Schema):
    """Integrity record of one bundle file."""

    sha256: str = _field(_checked(_is(str), _SHA256.fullmatch, "expected 64 lowercase hex digits"))
    bytes: int = _field(_checked(_is(int), lambda v: v >= 0, "must be >= 0"))


@dataclass(frozen=True)
class ModelEntry(_Schema):
    """One model file of a given precision and the names of its graph input/output."""

    file: str = _field(_relpath)
    input_name: str = _field(_is(str))
    output_name: str = _field(_is(str))
    quantization: dict | None = _field(_optional(_is(dict)), None)

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


@dataclass(frozen=True)
class Golden(_Schema):
    """Preprocessed golden inputs [N,3,H,W] and the PyTorch fp32 outputs [N,D] for them."""

    WHERE = "golden"

    inputs: str = _field(_relpath)
    outputs: str = _field(_relpath)
    images: tuple[str, ...] | None = _field(_optional(_paths), None)


@dataclass(frozen=True)
class Parity(_Schema):
    """Thresholds the bundle is held to, and what was measured at export (per precision)."""

    WHERE = "parity"

    thresholds: dict[str, Thresholds] = _field(_table(_precision, _thresholds), factory=dict)
    results: dict[str, dict] = _field(_table(_precision, _is(dict)), factory=dict)


def _schema_version(value: Any, where: str) -> int:
    version = _is(int)(value, where)
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
    return version


@dataclass(frozen=True)
class Manifest(_Schema):
    """Everything the device needs to know about a bundle."""

    architecture: str = _field(_checked(_is(str), bool, "must not be empty"))
    input: InputSpec = _field(_nested(InputSpec))
    output: OutputSpec = _field(_nested(OutputSpec))
    models: dict[str, ModelEntry] = _field(
        _checked(_table(_precision, _nested(ModelEntry)), bool, "needs at least one model")
    )
    golden: Golden = _field(_nested(Golden))
    files: dict[str, FileEntry] = _field(_table(_relpath, _nested(FileEntry)), factory=dict)
    parity: Parity = _field(_nested(Parity), factory=Parity)
    provenance: dict[str, Any] = _field(_is(dict), factory=dict)
    verified: bool = _field(_is(bool), False)
    created: str = _field(_is(str), "")
    kt_edge_version: str = _field(_is(str), "")
    schema_version: int = _field(_schema_version, SCHEMA_VERSION)

    @classmethod
    def from_dict(cls, raw: Any, where: str | None = None) -> Manifest:
        data = _take(raw, "manifest")
        data.pop("digest", None)  # checked against the whole file by load_bundle
        if "schema_version" not in data:
            raise _fail("schema_version", "is missing")
        _schema_version(data["schema_version"], "schema_version")  # first: a newer schema's fields are not ours
        return super().from_dict(data, "")

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
    manifest = replace(manifest, files=dict(sorted(files.items())))
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
