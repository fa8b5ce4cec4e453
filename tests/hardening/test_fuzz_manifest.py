"""Fuzzed bundle manifests: any manifest.json yields a Manifest or one BundleError, never another exception."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kt_edge_runtime.bundle import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleError,
    Golden,
    InputSpec,
    Manifest,
    ModelEntry,
    OutputSpec,
    Parity,
    _digest,
    load_bundle,
    write_manifest,
)
from kt_edge_runtime.parity import DEFAULT_THRESHOLDS

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

VALID = Manifest(
    architecture="alexnet",
    input=InputSpec(shape=(3, 8, 8), resize=8, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    output=OutputSpec(name="embedding", dim=4, normalized=False),
    models={"fp32": ModelEntry(file="model.fp32.onnx", input_name="images", output_name="embedding")},
    golden=Golden(inputs="golden/inputs.npy", outputs="golden/outputs.npy"),
    parity=Parity(thresholds={"fp32": DEFAULT_THRESHOLDS["fp32"]}, results={"fp32": {"passed": True}}),
    provenance={"recipe": "abc"},
    verified=True,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(
        [
            "fp32",
            "fp16",
            "int8",
            "model.fp32.onnx",
            "../x",
            "/etc/passwd",
            "a\x00b",
            "a//b",
            "0" * 64,
            "NCHW",
            "float32",
            SCHEMA_VERSION,
            SCHEMA_VERSION + 1,
            0,
            -1,
        ]
    )
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every key path of a JSON tree (dict keys and list indices)."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


VALID_DICT = VALID.to_dict()
VALID_PATHS = [p for p in _paths(VALID_DICT) if p]


def _mutate(data: dict, path: tuple, value, drop: bool) -> dict:
    data = copy.deepcopy(data)
    node = data
    for key in path[:-1]:
        node = node[key]
    if drop and isinstance(node, dict):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return data


def _manifest_or_bundle_error(call):
    try:
        result = call()
    except BundleError as exc:
        assert str(exc)
        return None
    assert isinstance(result, Manifest)
    return result


@FUZZ
@given(json_values)
def test_from_dict_on_arbitrary_json(raw):
    _manifest_or_bundle_error(lambda: Manifest.from_dict(raw))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(VALID_PATHS), json_values, st.booleans()), min_size=1, max_size=3))
def test_from_dict_on_mutated_valid_manifest(mutations):
    data = VALID_DICT
    for path, value, drop in mutations:
        try:
            data = _mutate(data, path, value, drop)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed this path
            continue
    manifest = _manifest_or_bundle_error(lambda: Manifest.from_dict(data))
    if manifest is not None:  # whatever parses must survive its own round trip
        assert Manifest.from_dict(manifest.to_dict()) == manifest


@pytest.fixture
def bundle_dir(tmp_path):
    (tmp_path / "golden").mkdir()
    (tmp_path / "model.fp32.onnx").write_bytes(b"model bytes, only hashed here")
    np.save(tmp_path / "golden" / "inputs.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(tmp_path / "golden" / "outputs.npy", np.ones((2, 4), np.float32))
    write_manifest(tmp_path, VALID)
    return tmp_path


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(VALID_PATHS + [("files",), ("digest",)]), json_values, st.booleans()),
        min_size=1,
        max_size=3,
    ),
    st.booleans(),
)
def test_load_bundle_on_mutated_and_rehashed_manifest(bundle_dir, mutations, rehash):
    """Rehashing gets past the digest check, so the schema and file checks behind it are fuzzed too."""
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    original = copy.deepcopy(data)
    for path, value, drop in mutations:
        try:
            data = _mutate(data, path, value, drop)
        except (KeyError, IndexError, TypeError):
            continue
    data = json.loads(json.dumps(data))  # what a file can hold: JSON object keys are strings
    if rehash:
        data["digest"] = _digest(data)
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(data))
    manifest = _manifest_or_bundle_error(lambda: load_bundle(bundle_dir))
    if manifest is not None:
        assert manifest.files == Manifest.from_dict(original).files or rehash


@FUZZ
@given(
    st.binary(max_size=300)
    | st.text(max_size=300).map(str.encode)
    | st.sampled_from([b"{}", b"null", b"1e999", b'{"schema_version": NaN}', b"\xef\xbb\xbf{}"])
)
def test_load_bundle_on_arbitrary_bytes(bundle_dir, blob):
    (bundle_dir / MANIFEST_NAME).write_bytes(blob)
    _manifest_or_bundle_error(lambda: load_bundle(bundle_dir))


def test_newer_schema_version_is_refused_before_anything_else(bundle_dir):
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    data["a_field_from_the_future"] = {"x": 1}
    data["digest"] = _digest(data)
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"schema_version {SCHEMA_VERSION + 1} is newer.*upgrade"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("value", [None, [0.1], {"x": 1}])
def test_threshold_of_wrong_type_is_a_bundle_error(value):
    data = copy.deepcopy(VALID_DICT)
    data["parity"]["thresholds"]["fp32"]["min_cosine"] = value
    with pytest.raises(BundleError, match="parity.thresholds.fp32"):
        Manifest.from_dict(data)


def test_deeply_nested_manifest_is_a_bundle_error(bundle_dir):
    (bundle_dir / MANIFEST_NAME).write_bytes(b"[" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)
