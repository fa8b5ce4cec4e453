"""Files from the internet run nothing and are used only when intact: checkpoints are read as safetensors
or with weights_only=True, CIFAR pickles only when they are the official files, bundles only after every
file matched its sha256."""

from __future__ import annotations

import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import yaml
from sample_kit import tiny_recipe_dict
from typer.testing import CliRunner

from kt_edge.cli import app
from kt_edge.data.sources import open_images
from kt_edge.errors import CheckpointError, DataError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import SIDECAR, WEIGHTS, load_backbone, save_backbone
from kt_edge.models.importers import import_teacher, read_checkpoint


class Exploit:
    """Unpickling this runs a shell command: what a booby-trapped checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def planted(tmp_path, kind: str):
    """A checkpoint whose weights come with an exploit, in torch's zip format or as a plain pickle."""
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / f"evil-{kind}.pth"
    payload = {"state_dict": build_backbone("alexnet", 32).state_dict(), "extra": Exploit(marker)}
    if kind == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path, marker


def load_unsafely(path):
    if path.read_bytes()[:2] == b"PK":
        return torch.load(path, weights_only=False)
    return pickle.loads(path.read_bytes())


@pytest.mark.parametrize(
    "kind, message",
    [
        ("zip", "refused, the pickle holds more than weights: it would call posix.system"),  # torch.save's format
        ("pickle", "refused, the pickle holds more than weights"),  # a bare pickle (protocol 2)
    ],
)
def test_a_booby_trapped_checkpoint_is_refused_and_runs_nothing(tmp_path, kind, message):
    path, marker = planted(tmp_path, kind)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        import_teacher(path, "alexnet", 32)
    assert not marker.exists()
    load_unsafely(path)  # the same file, loaded the unsafe way, does run its command
    assert marker.exists()


def test_the_cli_refuses_a_booby_trapped_teacher(tmp_path):
    path, marker = planted(tmp_path, "zip")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(tiny_recipe_dict(tmp_path / "runs", teacher={"arch": "alexnet", "checkpoint": str(path)}))
    )
    result = CliRunner().invoke(app, ["train-teacher", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "refused, the pickle holds more than weights: it would call posix.system" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert not (tmp_path / "runs" / "tiny" / "teacher" / SIDECAR).exists()


def test_plain_weights_in_a_pickle_are_accepted(tmp_path):
    """The refusal is about code, not about the format: a plain state dict imports."""
    net = build_backbone("alexnet", 32)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "plain.pth")
    teacher, _ = import_teacher(tmp_path / "plain.pth", "alexnet", 32)
    ours, theirs = net.state_dict(), teacher.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"{not safetensors"])
def test_a_corrupt_safetensors_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "teacher.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(tmp_path / "teacher.safetensors")


def test_a_checkpoint_folder_with_corrupt_weights_or_sidecar_is_a_clear_error(tmp_path):
    folder = tmp_path / "ckpt"
    save_backbone(build_backbone("alexnet", 32), folder)
    weights = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_backbone(folder)
    (folder / WEIGHTS).write_bytes(weights)
    (folder / SIDECAR).write_text('{"arch": "vgg_from_the_internet", "image_size": 32}')
    with pytest.raises(CheckpointError, match="not a valid checkpoint sidecar"):
        load_backbone(folder)
    (folder / SIDECAR).write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_backbone(folder)


def test_cifar_pickles_other_than_the_official_files_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned-cifar"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {"data": np.zeros((10, 3072), np.uint8), "labels": list(range(10)), "x": Exploit(marker)}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="not a CIFAR-10 python folder"):
        open_images(tmp_path, format="cifar10")
    assert not marker.exists()


# --------------------------------------------------------------------------- bundles


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real tiny bundle: a conv net exported to ONNX, golden vectors from PyTorch, hashed manifest."""
    from kt_edge_runtime.bundle import Golden, InputSpec, Manifest, ModelEntry, OutputSpec, write_manifest

    root = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    golden = torch.randn(4, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as kt-edge export uses
        torch.onnx.export(
            net,
            (golden,),
            str(root / "model.fp32.onnx"),
            dynamo=False,
            input_names=["images"],
            output_names=["embedding"],
            dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}},
        )
    (root / "golden").mkdir()
    np.save(root / "golden" / "inputs.npy", golden.numpy())
    with torch.no_grad():
        np.save(root / "golden" / "outputs.npy", net(golden).numpy())
    write_manifest(
        root,
        Manifest(
            architecture="tiny-conv",
            input=InputSpec(shape=(3, 16, 16), resize=16, crop=16, mean=(0.5,) * 3, std=(0.25,) * 3),
            output=OutputSpec(name="embedding", dim=8, normalized=False),
            models={"fp32": ModelEntry("model.fp32.onnx", "images", "embedding")},
            golden=Golden("golden/inputs.npy", "golden/outputs.npy"),
            verified=True,
        ),
    )
    return root


@pytest.fixture
def sessions(monkeypatch):
    """Every onnxruntime session the runtime opens, by model path."""
    import onnxruntime

    opened, real = [], onnxruntime.InferenceSession

    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", spy)
    return opened


def runtime(*args) -> int:
    from kt_edge_runtime.cli import main

    return main([str(a) for a in args])


def test_an_intact_bundle_verifies(bundle, sessions, capsys):
    assert runtime("verify", bundle) == 0, capsys.readouterr().err
    assert sessions == ["model.fp32.onnx"]


@pytest.mark.parametrize(
    "command", [["verify"], ["bench", "--iters", "1", "--warmup", "0"], ["embed", "images", "-o", "out.npy"]]
)
@pytest.mark.parametrize("tampered", ["model.fp32.onnx", "golden/outputs.npy"])
def test_a_tampered_bundle_file_is_refused_before_any_use(bundle, tmp_path, sessions, capsys, command, tampered):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / tampered).read_bytes())
    data[-5] ^= 0xFF  # one flipped byte, same size
    (copy / tampered).write_bytes(bytes(data))
    (tmp_path / "images").mkdir()
    args = [command[0], copy, *[tmp_path / a if a in ("images", "out.npy") else a for a in command[1:]]]
    assert runtime(*args) == 2
    assert f"bundle file {tampered} does not match its sha256" in capsys.readouterr().err
    assert sessions == []  # no model was loaded, let alone run
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("layout", ["timm config.json", "kt-edge sidecar"])
def test_a_timm_hub_reference_is_refused_before_timm_is_called(tmp_path, monkeypatch, layout):
    """timm fetches a "hf-hub:..." model's config from the hub even with pretrained=False: never called."""
    import json
    import sys
    import types

    from safetensors.torch import save_file

    calls = []
    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=lambda *a, **k: calls.append(a)))
    hub = "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"
    folder = tmp_path / "teacher"
    folder.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    if layout == "timm config.json":
        (folder / "config.json").write_text(json.dumps({"architecture": hub}))
    else:
        (folder / SIDECAR).write_text(json.dumps({"arch": f"timm/{hub}", "image_size": 32}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "runs", teacher={"checkpoint": str(folder)})))
    result = CliRunner().invoke(app, ["train-teacher", str(recipe)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: timm teacher '{hub}': a hub reference, which timm would download")
    assert len(result.output.strip().splitlines()) == 1
    assert calls == []
