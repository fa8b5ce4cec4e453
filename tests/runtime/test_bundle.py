"""The manifest schema and the integrity checks load_bundle makes before anything runs."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import MISSING, fields, replace

import numpy as np
import pytest
from kt_edge_runtime.bundle import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleError,
    Golden,
    InputSpec,
    Manifest,
    ModelEntry,
    OutputSpec,
    _digest,
    load_bundle,
    read_golden,
    sha256_file,
    write_manifest,
)
from kt_edge_runtime.parity import DEFAULT_THRESHOLDS


def small_manifest() -> Manifest:
    return Manifest(
        architecture="resnet18",
        input=InputSpec(shape=(3, 8, 8), resize=10, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        output=OutputSpec(name="embedding", dim=4, normalized=True),
        models={"fp32": ModelEntry(file="model.fp32.onnx", input_name="images", output_name="embedding")},
        golden=Golden(inputs="golden/inputs.npy", outputs="golden/outputs.npy"),
        provenance={"recipe_hash": "abc", "metrics": {"knn_top1": 71.5}},
    )


@pytest.fixture
def small_bundle(tmp_path):
    (tmp_path / "golden").mkdir()
    (tmp_path / "model.fp32.onnx").write_bytes(b"not really onnx, only hashed here")
    np.save(tmp_path / "golden" / "inputs.npy", np.zeros((2, 3, 8, 8), np.float32))
    np.save(tmp_path / "golden" / "outputs.npy", np.ones((2, 4), np.float32))
    (tmp_path / "notes.txt").write_text("extra file")
    write_manifest(tmp_path, small_manifest(), extra_files=["notes.txt"])
    return tmp_path


def edit_manifest(bundle_dir, change) -> None:
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    change(data)
    (bundle_dir / MANIFEST_NAME).write_text(json.dumps(data))


def test_round_trip_through_dict_and_disk(small_bundle):
    original = small_manifest()
    assert Manifest.from_dict(original.to_dict()) == original
    loaded = load_bundle(small_bundle)
    assert loaded.schema_version == SCHEMA_VERSION
    assert loaded.input == original.input and loaded.models == original.models
    assert set(loaded.files) == {"model.fp32.onnx", "golden/inputs.npy", "golden/outputs.npy", "notes.txt"}
    assert loaded.files["notes.txt"].sha256 == sha256_file(small_bundle / "notes.txt")
    assert loaded.files["notes.txt"].bytes == len("extra file")
    x, y = read_golden(small_bundle, loaded)
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 4)


def test_every_field_is_read_checked_and_written_from_its_declaration():
    """A manifest with every optional part set survives the round trip; every field is written, and a
    manifest without it falls back to the declared default or is refused naming the field."""
    from kt_edge_runtime.bundle import FileEntry, Parity

    full = replace(
        small_manifest(),
        models={"int8": ModelEntry(file="m.int8.onnx", input_name="x", output_name="y", quantization={"bits": 8})},
        golden=Golden(inputs="golden/inputs.npy", outputs="golden/outputs.npy", images=("golden/a.jpg",)),
        files={"m.int8.onnx": FileEntry(sha256="0" * 64, bytes=3)},
        parity=Parity(thresholds={"int8": DEFAULT_THRESHOLDS["int8"]}, results={"int8": {"passed": True}}),
        verified=True,
    )
    data = full.to_dict()
    assert json.loads(json.dumps(data)) == data and Manifest.from_dict(data) == full
    parts = {
        (): Manifest,
        ("input",): InputSpec,
        ("output",): OutputSpec,
        ("golden",): Golden,
        ("parity",): Parity,
        ("models", "int8"): ModelEntry,
        ("files", "m.int8.onnx"): FileEntry,
    }
    for where, part in parts.items():
        for f in fields(part):
            broken = copy.deepcopy(data)
            node = broken
            for key in where:
                node = node[key]
            del node[f.name]  # KeyError: a field to_dict did not write
            name = ".".join((*where, f.name))
            if f.default is MISSING and f.default_factory is MISSING or name == "schema_version":
                with pytest.raises(BundleError, match=f"'{re.escape(name)}': is missing"):
                    Manifest.from_dict(broken)
                continue
            read = Manifest.from_dict(broken)
            for key in where:
                read = read[key] if isinstance(read, dict) else getattr(read, key)
            assert getattr(read, f.name) == (f.default if f.default is not MISSING else f.default_factory()), name


def test_tampered_file_is_refused_naming_it(small_bundle):
    (small_bundle / "model.fp32.onnx").write_bytes(b"not really onnx, only hashed hers")  # same size
    with pytest.raises(BundleError, match="model.fp32.onnx.*sha256"):
        load_bundle(small_bundle)


def test_resized_file_is_refused(small_bundle):
    with open(small_bundle / "golden" / "outputs.npy", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="golden/outputs.npy"):
        load_bundle(small_bundle)


def test_missing_file_is_refused(small_bundle):
    (small_bundle / "notes.txt").unlink()
    with pytest.raises(BundleError, match="notes.txt is missing"):
        load_bundle(small_bundle)


def test_tampered_manifest_is_refused(small_bundle):
    edit_manifest(small_bundle, lambda d: d["input"].update(mean=[0.4, 0.5, 0.5]))
    with pytest.raises(BundleError, match="manifest.json was modified"):
        load_bundle(small_bundle)


def test_rehashed_manifest_with_swapped_file_is_refused(small_bundle):
    """Editing a listed hash to match a swapped file still breaks the manifest digest."""
    (small_bundle / "model.fp32.onnx").write_bytes(b"other model")
    new = sha256_file(small_bundle / "model.fp32.onnx")
    edit_manifest(small_bundle, lambda d: d["files"]["model.fp32.onnx"].update(sha256=new, bytes=11))
    with pytest.raises(BundleError, match="manifest.json"):
        load_bundle(small_bundle)


def test_newer_schema_is_refused_with_upgrade_hint(small_bundle):
    edit_manifest(small_bundle, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(BundleError, match="newer than this runtime supports.*upgrade"):
        load_bundle(small_bundle)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["input"].pop("crop"), "input.crop"),
        (lambda d: d["input"].update(shape=[1, 8, 8]), "input.shape"),
        (lambda d: d["input"].update(mean=[0.5, 0.5]), "input.mean"),
        (lambda d: d["input"].update(layout="NHWC"), "input.layout"),
        (lambda d: d["output"].update(dim="4"), "output.dim"),
        (lambda d: d["models"].update(fp8=d["models"]["fp32"]), "models.fp8"),
        (lambda d: d["models"]["fp32"].update(file="../escape.onnx"), "models.fp32.file"),
        (lambda d: d["golden"].update(inputs="/abs/inputs.npy"), "golden.inputs"),
        (lambda d: d.update(colour="RGB"), "colour"),
        (lambda d: d["parity"]["thresholds"].update(fp32={"rtol": 1e-3}), "parity.thresholds.fp32"),
        (lambda d: d.update(verified="yes"), "verified"),
        (lambda d: d["files"].update({"m.onnx": {"sha256": "0" * 64 + "\n", "bytes": 1}}), "files.m.onnx.sha256"),
    ],
)
def test_schema_errors_name_the_field(change, field):
    data = small_manifest().to_dict()
    change(data)
    with pytest.raises(BundleError, match=f"'{field}'"):
        Manifest.from_dict(data)


def test_unlisted_reference_is_refused(small_bundle):
    """A manifest pointing at a file without a hash would skip the integrity check."""
    data = json.loads((small_bundle / MANIFEST_NAME).read_text())
    del data["files"]["golden/inputs.npy"]
    data["digest"] = _digest(data)
    (small_bundle / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="golden/inputs.npy"):
        load_bundle(small_bundle)


def test_write_manifest_refuses_missing_referenced_file(tmp_path):
    with pytest.raises(BundleError, match="model.fp32.onnx does not exist"):
        write_manifest(tmp_path, small_manifest())
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{ nope")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_golden_shape_mismatch_is_refused(small_bundle):
    np.save(small_bundle / "golden" / "outputs.npy", np.ones((2, 5), np.float32))
    manifest = write_manifest(small_bundle, small_manifest())
    with pytest.raises(BundleError, match=r"golden outputs .* \[2, 4\]"):
        read_golden(small_bundle, manifest)
