"""The device CLI, run as a subprocess in which importing torch or torchvision raises."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import kt_edge_runtime
import numpy as np
import onnx
import pytest
from kt_edge_runtime.bundle import MANIFEST_NAME, Manifest, write_manifest

BLOCKER = """
import os
with open(os.environ["KT_EDGE_TORCH_MARKER"], "a") as fh:
    fh.write(__name__ + "\\n")
raise ImportError("{name} is blocked: the device runtime must not import it")
"""


@pytest.fixture
def torchless(tmp_path):
    """Run `python -m kt_edge_runtime ...` where torch and torchvision cannot be imported."""
    blocked = tmp_path / "blocked"
    for name in ("torch", "torchvision"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(BLOCKER.format(name=name))
    marker = tmp_path / "torch-import-attempts.txt"
    # The runtime under test (this checkout's, not whichever is installed) behind the blockers.
    runtime = Path(kt_edge_runtime.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(blocked), str(runtime)]),
        "KT_EDGE_TORCH_MARKER": str(marker),
    }
    env.pop("KT_EDGE_PUBLIC_KEY", None)

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "kt_edge_runtime", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        attempts = marker.read_text() if marker.exists() else ""
        assert not attempts, f"the runtime tried to import: {attempts}"
        return proc

    return run


def test_blocker_really_blocks(torchless, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "blocked"), "KT_EDGE_TORCH_MARKER": str(tmp_path / "m")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_verify_passes_without_torch(torchless, bundle):
    proc = torchless("verify", bundle)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all("PASS" in line for line in lines)
    assert {line.split()[0] for line in lines} == {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx"}


def test_verify_failure_is_one_line_naming_file_and_worst_sample(torchless, bundle_copy):
    model = onnx.load(str(bundle_copy / "model.fp32.onnx"))
    weight = [t for t in model.graph.initializer if len(t.dims) == 4][-1]
    weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * np.float32(1.01), weight.name))
    onnx.save(model, str(bundle_copy / "model.fp32.onnx"))
    write_manifest(bundle_copy, Manifest.from_dict(json.loads((bundle_copy / MANIFEST_NAME).read_text())))

    proc = torchless("verify", bundle_copy, "--precision", "fp32")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("model.fp32.onnx") and "FAIL" in line and "worst sample" in line


def test_tampered_bundle_exits_2_naming_the_file(torchless, bundle_copy):
    with open(bundle_copy / "golden" / "inputs.npy", "r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")
    proc = torchless("verify", bundle_copy)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "golden/inputs.npy" in line


def test_embed_reproduces_golden_outputs_from_image_files(torchless, bundle, tmp_path):
    """Image files -> runtime preprocessing -> ONNX Runtime matches PyTorch on torchvision-preprocessed inputs."""
    out = tmp_path / "emb.npy"
    proc = torchless("embed", bundle, bundle / "golden" / "images", "-o", out, "--batch-size", "5")
    assert proc.returncode == 0, proc.stderr
    embeddings = np.load(out)
    golden = np.load(bundle / "golden" / "outputs.npy")
    assert embeddings.shape == golden.shape and embeddings.dtype == np.float32
    listed = out.with_suffix(".txt").read_text().splitlines()
    assert [Path(p).name for p in listed] == sorted(p.name for p in (bundle / "golden" / "images").iterdir())
    cos = (embeddings * golden).sum(1) / np.linalg.norm(embeddings, axis=1) / np.linalg.norm(golden, axis=1)
    assert cos.min() > 0.99999


def test_bench_writes_json(torchless, bundle, tmp_path):
    out = tmp_path / "bench.json"
    proc = torchless("bench", bundle, "--precision", "int8", "--batch-sizes", "1,4", "--iters", "3", "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["precision"] == "int8" and data["model"] == "model.int8.onnx" and data["device"]
    assert [r["batch"] for r in data["results"]] == [1, 4]
    for r in data["results"]:
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput_ips"] > 0
    assert "p50 ms" in proc.stdout
    # which kernels ran, from ONNX Runtime's profiler: the full-range int8 model on the exact u8u8 mode
    kernels = data["kernels"]
    assert kernels["ops"]["QLinearConv"] >= 1 and kernels["x64quantprecision"] is True
    assert kernels["int8"].startswith("fused int8 kernels") and f"kernels: {kernels['int8']}" in proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
@pytest.mark.parametrize("command", [["build-engine", "--precision", "fp16"], ["verify", "--backend", "tensorrt"]])
def test_missing_tensorrt_is_a_one_line_error(torchless, bundle, command):
    proc = torchless(command[0], bundle, *command[1:])
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "TensorRT is not installed" in line


def test_usage_errors(torchless, bundle, tmp_path):
    assert torchless("--version").stdout.startswith("kt-edge-runtime ")
    proc = torchless("bench", bundle, "--batch-sizes", "1,x")
    assert proc.returncode == 2 and "comma-separated" in proc.stderr
    proc = torchless("embed", bundle, tmp_path / "nope.jpg", "-o", tmp_path / "o.npy")
    assert proc.returncode == 2 and "nope.jpg" in proc.stderr
