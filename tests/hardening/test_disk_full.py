"""Out of disk in the middle of a write: no target file appears, no temp file stays, an older complete
artifact is never vouched for by a half-written one, and the stage can be run again."""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_kit import SAMPLE

from kt_edge import atomic
from kt_edge.data.augment import eval_transform
from kt_edge.data.sources import open_images
from kt_edge.engine.trainer import RESUME, train
from kt_edge.models import checkpoint
from kt_edge.models.backbones import build_backbone
from kt_edge.recipe import ExportConfig, TrainConfig
from kt_edge.teachers.moco import MoCo


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def half_then_disk_full(path_arg: int = 1):
    """A stand-in for a real writer: writes part of the file at its path argument, then the disk is full."""

    def write(*args, **_kwargs):
        target = args[path_arg]
        if hasattr(target, "write"):
            target.write(b"\x93NUMPY partial")
        else:
            with open(target, "wb") as handle:
                handle.write(b"partial")
        disk_full()

    return write


def files_in(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def assert_no_temp_files(folder: Path) -> None:
    temps = [name for name in files_in(folder) if name.rsplit("/", 1)[-1].startswith(".")]
    assert not temps, f"temp files left: {temps}"


def test_json_artifact(tmp_path, monkeypatch):
    target = tmp_path / "eval" / "results.json"
    atomic.write_json(target, {"old": True})
    monkeypatch.setattr(Path, "write_bytes", half_then_disk_full(path_arg=0))
    with pytest.raises(OSError, match="No space left"):
        atomic.write_json(target, {"new": True})
    assert json.loads(target.read_text()) == {"old": True}  # the last complete version stays
    assert_no_temp_files(tmp_path)


def test_fsync_failing_at_the_end_of_a_write(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text(tmp_path / "recipe.yaml", "name: x\n")
    assert files_in(tmp_path) == set()


def test_checkpoint_weights(tmp_path, monkeypatch):
    folder = tmp_path / "teacher"
    backbone = build_backbone("alexnet", 32)
    checkpoint.save_backbone(backbone, folder, inputs="old-recipe")
    monkeypatch.setattr(checkpoint, "save_file", half_then_disk_full())
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_backbone(backbone, folder, inputs="new-recipe")
    # the old weights stay, but no sidecar vouches for them any more: the stage will run again
    assert files_in(folder) == {checkpoint.WEIGHTS}
    assert checkpoint.read_sidecar(folder) is None


def test_checkpoint_sidecar(tmp_path, monkeypatch):
    folder = tmp_path / "student"
    monkeypatch.setattr(checkpoint.atomic, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_backbone(build_backbone("alexnet", 32), folder, inputs="x")
    assert files_in(folder) == {checkpoint.WEIGHTS}  # weights without a sidecar: not a complete checkpoint
    with pytest.raises(Exception, match="no complete checkpoint"):
        checkpoint.load_backbone(folder)


def test_resume_point(tmp_path, monkeypatch):
    data = open_images(SAMPLE / "train", subset=32, seed=0)
    torch.manual_seed(0)
    method = MoCo(build_backbone("alexnet", 32), {"queue": 8, "hidden": 16, "dim": 8}, len(data))
    real_save, calls = torch.save, {"n": 0}

    def second_save_fails(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            return half_then_disk_full()(obj, path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    cfg = TrainConfig(epochs=1, max_steps=2, batch_size=16, lr=0.01, checkpoint_every=1, log_every=1)
    with pytest.raises(OSError, match="No space left"):
        train(method, data, cfg, tmp_path, stage="teacher", seed=0, device=torch.device("cpu"), image_size=32)
    assert files_in(tmp_path) == {RESUME}
    assert torch.load(tmp_path / RESUME, weights_only=True)["step"] == 1  # the last complete resume point


def test_feature_shard(tmp_path, monkeypatch):
    from kt_edge import features

    data = open_images(SAMPLE / "test", subset=8, seed=0).with_transform(eval_transform(32))
    model = build_backbone("alexnet", 32)
    monkeypatch.setattr(features.np, "save", half_then_disk_full(path_arg=0))  # the first shard's labels
    with pytest.raises(OSError, match="No space left"):
        features.extract(model, data, tmp_path, shard_size=4, progress=False)
    assert files_in(tmp_path) == {features.PLAN_NAME}  # neither shard file, no index
    monkeypatch.undo()
    store = features.extract(model, data, tmp_path, shard_size=4, progress=False)  # the disk was freed: go on
    assert store.n == 8 and files_in(tmp_path) >= {features.INDEX_NAME, "shard-00000.npy", "shard-00001.npy"}


def test_bundle_golden_vectors(tmp_path, monkeypatch):
    from kt_edge.export import bundle

    student = tmp_path / "student"
    checkpoint.save_backbone(build_backbone("alexnet", 32), student)
    images = open_images(SAMPLE / "test", subset=8, seed=0).with_transform(eval_transform(32))
    out = tmp_path / "bundle"
    (out / "golden").mkdir(parents=True)
    (out / "manifest.json").write_text("{}")  # an earlier export's manifest
    monkeypatch.setattr(bundle.np, "save", half_then_disk_full(path_arg=0))
    with pytest.raises(OSError, match="No space left"):
        bundle.build_bundle(student, out, images, images, ExportConfig(golden=2), 0, {})
    assert files_in(out) == set()  # no golden file, and no manifest vouching for the bundle


def test_bundle_manifest(tmp_path, monkeypatch):
    from kt_edge_runtime.bundle import Golden, InputSpec, Manifest, ModelEntry, OutputSpec, write_manifest

    (tmp_path / "golden").mkdir()
    (tmp_path / "model.fp32.onnx").write_bytes(b"model")
    np.save(tmp_path / "golden" / "inputs.npy", np.zeros((1, 3, 8, 8), np.float32))
    np.save(tmp_path / "golden" / "outputs.npy", np.zeros((1, 4), np.float32))
    manifest = Manifest(
        architecture="alexnet",
        input=InputSpec(shape=(3, 8, 8), resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3),
        output=OutputSpec(name="embedding", dim=4, normalized=False),
        models={"fp32": ModelEntry("model.fp32.onnx", "images", "embedding")},
        golden=Golden("golden/inputs.npy", "golden/outputs.npy"),
    )
    before = files_in(tmp_path)
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_manifest(tmp_path, manifest)
    assert files_in(tmp_path) == before


# ---------------------------------------------------------------- a real full disk, through the CLI
# torch.save reports a full disk as "RuntimeError: ... unexpected pos" and safetensors as "SafetensorError ...
# (os error 28)": both must still be told as the full disk they are, in one line.

DISK_FULL = (
    "error: out of disk space (No space left on device); nothing partial was kept: free space and run "
    "the same command again (with --resume for training)"
)


def _recipe_on(tmp_path: Path, **sections) -> tuple[Path, Path]:
    import yaml
    from sample_kit import tiny_recipe_dict

    runs = tmp_path / "runs"
    runs.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(runs, **sections)))
    return recipe, runs


def test_a_full_tmpfs_during_the_resume_point_is_one_line(tmp_path):
    from process_kit import error_lines, on_tmpfs

    recipe, runs = _recipe_on(
        tmp_path,
        teacher={
            "arch": "alexnet",
            "options": {"queue": 32, "hidden": 32, "dim": 16},
            "train": {"max_steps": 2, "batch_size": 16, "checkpoint_every": 1},
        },
    )
    code, err, files = on_tmpfs(runs, "1m", "train-teacher", recipe)
    assert code == 1, err
    assert error_lines(err) == [DISK_FULL], err
    assert files == ["tiny/metrics.jsonl", "tiny/recipe.yaml"]  # no resume point, whole or half, and no temp file


def test_a_full_tmpfs_during_model_safetensors_is_one_line(tmp_path):
    from process_kit import error_lines, on_tmpfs

    weights = tmp_path / "teacher.pth"
    torch.save(build_backbone("alexnet", 32).state_dict(), weights)  # 9 MiB of weights for a 1 MiB disk
    recipe, runs = _recipe_on(tmp_path, teacher={"arch": "alexnet", "checkpoint": str(weights)})
    code, err, files = on_tmpfs(runs, "1m", "train-teacher", recipe)
    assert code == 1, err
    assert error_lines(err) == [DISK_FULL], err
    assert files == ["tiny/recipe.yaml"]


# The same two writers with the disk patched, where no tmpfs can be mounted.


class _AlmostFullDisk(io.FileIO):
    """A file on a disk with 100 bytes free."""

    def write(self, data) -> int:
        room = max(0, 100 - self.tell())
        if len(data) > room:
            super().write(bytes(data[:room]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_torch_save_into_a_full_file_raises_the_os_error(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "open", lambda path, mode: _AlmostFullDisk(path, mode.replace("b", "")), raising=False)
    with pytest.raises(OSError, match="No space left") as caught:  # not torch's "unexpected pos"
        with atomic.atomic_file(tmp_path / RESUME) as handle:
            torch.save({"w": torch.zeros(1000)}, handle)
    assert caught.value.errno == errno.ENOSPC
    assert files_in(tmp_path) == set()


def test_safetensors_reporting_os_error_28_raises_the_os_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*_args, **_kwargs):  # the text safetensors gives on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError, match="No space left") as caught:
        checkpoint.save_backbone(build_backbone("alexnet", 32), tmp_path)
    assert caught.value.errno == errno.ENOSPC
    assert files_in(tmp_path) == set()


def test_metrics_log_keeps_whole_lines_when_the_disk_fills_in_a_record(tmp_path, monkeypatch):
    from kt_edge.engine import metrics

    path = tmp_path / "metrics.jsonl"
    log = metrics.MetricsLog(path)
    log.write({"stage": "teacher", "step": 1})
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        log.write({"stage": "teacher", "step": 2})
    monkeypatch.undo()
    log.write({"stage": "teacher", "step": 2})  # space was freed
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
