"""Bundles the device must not use: tampered, forged, unsigned (when a key is given) or unverified.

Every runtime command refuses each with one line on stderr and exit 2, before any model is loaded:
the commands run where importing onnxruntime (and torch) raises.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kt_edge_runtime
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from kt_edge_runtime.bundle import MANIFEST_NAME, BundleError, Manifest, load_bundle, write_manifest
from kt_edge_runtime.signing import SIGNATURE_NAME, load_private_key, sign_manifest

BLOCKER = 'raise ImportError("{name} is blocked: a refused bundle must not get as far as loading a model")\n'


def write_keys(folder: Path, name: str) -> tuple[Path, Path]:
    key = ed25519.Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("keys")
    return {"ours": write_keys(folder, "ours"), "theirs": write_keys(folder, "theirs")}


def rewrite(bundle: Path, **changes) -> None:
    """Edit the manifest and re-digest it, as someone without the private key could."""
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    for key, value in changes.items():
        data[key] = value
    write_manifest(bundle, Manifest.from_dict(data))


@pytest.fixture
def modelless(tmp_path):
    """`python -m kt_edge_runtime ...` where onnxruntime, tensorrt and torch cannot be imported."""
    blocked = tmp_path / "blocked"
    for name in ("onnxruntime", "tensorrt", "torch"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(BLOCKER.format(name=name))
    runtime = Path(kt_edge_runtime.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(runtime)])}
    env.pop("KT_EDGE_PUBLIC_KEY", None)

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kt_edge_runtime", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


def commands(bundle: Path, out: Path) -> dict[str, list]:
    return {
        "verify": ["verify", bundle],
        "embed": ["embed", bundle, bundle / "golden" / "images", "-o", out],
        "bench": ["bench", bundle, "--iters", "1"],
        "build-engine": ["build-engine", bundle, "--precision", "fp16"],
    }


def tampered(bundle: Path, keys) -> list:
    with open(bundle / "model.fp32.onnx", "r+b") as fh:
        fh.seek(-3, os.SEEK_END)
        fh.write(b"\x01\x02\x03")
    return []


def forged(bundle: Path, keys) -> list:
    sign_manifest(bundle, load_private_key(keys["ours"][0]))
    thresholds = json.loads((bundle / MANIFEST_NAME).read_text())["parity"]["thresholds"]
    thresholds["int8"]["min_cosine"] = -1.0  # accept anything: re-digested, but the signature no longer fits
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    rewrite(bundle, parity={**data["parity"], "thresholds": thresholds})
    return ["--public-key", keys["ours"][1]]


def signed_by_someone_else(bundle: Path, keys) -> list:
    sign_manifest(bundle, load_private_key(keys["theirs"][0]))
    return ["--public-key", keys["ours"][1]]


def unsigned(bundle: Path, keys) -> list:
    return ["--public-key", keys["ours"][1]]


def unverified(bundle: Path, keys) -> list:
    data = json.loads((bundle / MANIFEST_NAME).read_text())
    results = {
        "int8": {
            "golden": {"passed": True},
            "split": {"passed": False, "failures": ["min cosine 0.86 < 0.98"]},
            "passed": False,
        }
    }
    rewrite(bundle, verified=False, parity={**data["parity"], "results": results})
    return []


BAD = {
    "tampered": (tampered, "model.fp32.onnx does not match its sha256"),
    "forged": (forged, "not a signature of this manifest"),
    "signed by another key": (signed_by_someone_else, "not a signature of this manifest"),
    "unsigned": (unsigned, "bundle is not signed"),
    "unverified": (unverified, r"not verified: export parity failed \(int8 split \(min cosine 0.86 < 0.98\)\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_command_refuses_a_bad_bundle_in_one_line(modelless, bundle_copy, keys, tmp_path, case):
    make, reason = BAD[case]
    extra = make(bundle_copy, keys)
    for name, args in commands(bundle_copy, tmp_path / "out.npy").items():
        proc = modelless(*args, *extra)
        assert proc.returncode == 2, (name, proc.stderr)
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("kt-edge-runtime: error: "), (name, line)
        assert re.search(reason, line), (name, line)
        assert "blocked" not in line and proc.stdout == "", name
    assert not (tmp_path / "out.npy").exists()


def test_a_bundle_signed_by_our_key_is_used(runtime_cli, bundle_copy, keys):
    sign_manifest(bundle_copy, load_private_key(keys["ours"][0]))
    assert load_bundle(bundle_copy, keys["ours"][1]).verified
    proc = runtime_cli("verify", bundle_copy, "--precision", "fp32", "--public-key", keys["ours"][1])
    assert proc.returncode == 0, proc.stderr
    env_key = runtime_cli("verify", bundle_copy, "--precision", "fp32", env={"KT_EDGE_PUBLIC_KEY": keys["theirs"][1]})
    assert env_key.returncode == 2 and "not a signature" in env_key.stderr


def test_unverified_bundle_is_used_when_allowed(runtime_cli, bundle_copy, keys):
    unverified(bundle_copy, keys)
    proc = runtime_cli("verify", bundle_copy, "--precision", "fp32", "--allow-unverified")
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stderr


def test_bad_keys_are_one_clear_error(bundle_copy, tmp_path, keys):
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(BundleError, match="not an? PEM public key"):
        load_bundle(bundle_copy, tmp_path / "junk.pem")
    with pytest.raises(BundleError, match="is not an Ed25519 key|not an? PEM public key"):
        load_bundle(bundle_copy, keys["ours"][0])  # a private key where the public one belongs
    (bundle_copy / SIGNATURE_NAME).write_text("@@@ not base64\n")
    with pytest.raises(BundleError, match="not a signature of this manifest"):
        load_bundle(bundle_copy, keys["ours"][1])


@pytest.fixture
def runtime_cli():
    """The runtime CLI of this checkout, with its normal dependencies."""
    runtime = Path(kt_edge_runtime.__file__).resolve().parents[1]

    def run(*args, env: dict | None = None) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k != "KT_EDGE_PUBLIC_KEY"}
        full = {**base, "PYTHONPATH": str(runtime), **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "kt_edge_runtime", *map(str, args)],
            env=full,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run
