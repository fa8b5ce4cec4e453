"""The trainer's batched data path (uint8 array -> device augmentation), compile, fused optimisers, recipe switches."""

import json

import ddp_train
import numpy as np
import pytest
import torch
import yaml
from sample_kit import SAMPLE, crashing_at, tiny_recipe_dict
from torchvision import transforms as T
from typer.testing import CliRunner

from kt_edge.cli import app
from kt_edge.data.augment import moco_v2
from kt_edge.data.feed import ArrayBatches, resolve_augment, sample_key
from kt_edge.data.gpu_augment import BatchAugment
from kt_edge.data.sources import ArrayImages, open_images
from kt_edge.engine.trainer import make_optimizer, networks, train
from kt_edge.errors import DataError
from kt_edge.recipe import TrainConfig

CPU = torch.device("cpu")


def _in_memory(n=64) -> ArrayImages:
    files = open_images(SAMPLE / "train", subset=n, seed=0)
    return ArrayImages(np.stack([np.asarray(files.image(i)) for i in range(n)]), files.labels, files.classes, "mem")


def _run(folder, method, data, steps, resume=False, compile=False):
    cfg = TrainConfig(
        epochs=100,
        max_steps=steps,
        batch_size=16,
        optimizer="adamw",
        lr=2e-3,
        checkpoint_every=2,
        log_every=1,
        compile=compile,
    )
    return train(
        method,
        data,
        cfg,
        folder,
        stage="distill",
        seed=0,
        device=CPU,
        image_size=32,
        resume=resume,
        metrics_path=folder / "metrics.jsonl",
        augment="batched",
    )


def test_batched_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    data = _in_memory()
    straight = ddp_train.method_for("seed", len(data))
    _run(tmp_path / "a", straight, data, steps=6)
    crashed = crashing_at(ddp_train.method_for("seed", len(data)), step=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "b", crashed, data, steps=6)
    resumed = ddp_train.method_for("seed", len(data))
    assert _run(tmp_path / "b", resumed, data, steps=6, resume=True).steps == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_batches_carry_uint8_pixels_and_per_image_keys():
    data = _in_memory(32)
    augment = BatchAugment.from_transform(moco_v2(32))
    batches = ArrayBatches(data, augment, seed=5, image_size=32)
    pixels, uniforms, labels = batches[[(2, 9), (2, 3), (2, 30)]]
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(pixels[1].numpy(), data.array[3])
    assert labels.tolist() == data.labels[[9, 3, 30]].tolist()
    torch.testing.assert_close(uniforms[2], augment.draw([sample_key(5, 2, 30)])[0], rtol=0, atol=0)


def test_batched_path_needs_pixels_at_the_training_size():
    files = open_images(SAMPLE / "train", subset=32, seed=0)
    with pytest.raises(DataError, match="data.cache: true"):
        resolve_augment("batched", files, 32, CPU)
    with pytest.raises(DataError, match="decoded at 32px"):
        ArrayBatches(
            ArrayImages(np.zeros((4, 40, 40, 3), np.uint8), np.zeros(4), [], "big"),
            BatchAugment.from_transform(moco_v2(32)),
            0,
            32,
        )


def test_auto_augment_is_batched_only_on_cuda_with_a_pixel_array():
    array, files = _in_memory(16), open_images(SAMPLE / "train", subset=16, seed=0)
    assert resolve_augment("auto", array, 32, torch.device("cuda")) == "batched"
    assert resolve_augment("auto", array, 32, CPU) == "per_sample"
    assert resolve_augment("auto", files, 32, torch.device("cuda")) == "per_sample"
    assert resolve_augment("auto", array, 64, torch.device("cuda")) == "per_sample"
    assert resolve_augment("per_sample", array, 32, torch.device("cuda")) == "per_sample"
    rotate = T.Compose([T.RandomRotation(10), T.ToTensor()])  # no batched version: auto falls back
    assert resolve_augment("auto", array, 32, torch.device("cuda"), moco_v2(32)) == "batched"
    assert resolve_augment("auto", array, 32, torch.device("cuda"), rotate) == "per_sample"
    with pytest.raises(DataError, match="RandomRotation"):
        resolve_augment("batched", array, 32, CPU, rotate)


def test_compiled_networks_train_like_eager_ones(tmp_path, monkeypatch):
    """torch.compile through dynamo's eager backend (inductor's C++ build takes minutes on a small CPU)."""
    import torch._dynamo

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="eager"))
    torch._dynamo.reset()
    data = _in_memory(48)
    plain, compiled = (ddp_train.method_for("seed", len(data)) for _ in range(2))
    _run(tmp_path / "plain", plain, data, steps=2)
    _run(tmp_path / "compiled", compiled, data, steps=2, compile=True)
    assert all(net._compiled_call_impl is not None for net in networks(compiled))
    assert list(plain.state_dict()) == list(compiled.state_dict())  # no _orig_mod prefixes
    for (name, a), b in zip(plain.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    torch._dynamo.reset()


def test_networks_include_a_frozen_teacher_and_leave_out_queues():
    method = ddp_train.method_for("seed", 64)
    found = networks(method)
    assert method.backbone in found and method.head in found and method.teacher.model in found
    assert method.queue not in found


def test_fused_optimisers_on_cuda_only():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("sgd", "adamw"):
        cfg = TrainConfig(optimizer=name)
        assert make_optimizer(params, cfg, CPU).defaults.get("fused") in (None, False)
        if torch.cuda.is_available():
            cuda_params = [torch.nn.Parameter(torch.zeros(3, device="cuda"))]
            assert make_optimizer(cuda_params, cfg, torch.device("cuda")).defaults["fused"] is True


def test_recipe_switches_reach_the_trainer_through_the_cli(tmp_path):
    data = tiny_recipe_dict(tmp_path / "runs")
    data["data"].update(cache=True, cache_dir=str(tmp_path / "cache"), augment="batched")
    data["teacher"].update(
        arch="alexnet", train={"epochs": 1, "max_steps": 2, "batch_size": 16, "lr": 0.05, "log_every": 1}
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["train-teacher", str(recipe)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tiny"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    state = torch.load(run / "teacher" / "resume.pt", weights_only=True)
    assert state["fingerprint"].endswith("+cache+batched")
    assert len(list((tmp_path / "cache").glob("*/cache.json"))) == 1
    bad = CliRunner().invoke(app, ["check", str(recipe), "-s", "data.augment=gpu"])
    assert bad.exit_code != 0 and "data.augment" in bad.output
