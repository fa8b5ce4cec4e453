import json

import pytest
import torch

from kt_edge.data.sources import open_images
from kt_edge.engine.trainer import train
from kt_edge.errors import DataError, TrainingError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.recipe import TrainConfig
from kt_edge.teachers.moco import MoCo
from kt_edge.transfer.seed import Seed

from sample_kit import SAMPLE

CPU = torch.device("cpu")


def _seed_method(n_images):
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_backbone("alexnet", 32), CPU)
    return Seed(build_backbone("alexnet", 32), teacher, {"queue": 16, "hidden": 64}, n_images)


def _run(tmp_path, method, data, steps, resume=False):
    cfg = TrainConfig(epochs=100, max_steps=steps, batch_size=16, optimizer="adamw", lr=2e-3, checkpoint_every=2)
    return train(method, data, cfg, tmp_path, stage="distill", seed=0, device=CPU, image_size=32,
                 resume=resume, metrics_path=tmp_path / "metrics.jsonl")


def test_training_lowers_the_loss(tmp_path):
    data = open_images(SAMPLE / "train", subset=32, seed=0)
    _run(tmp_path, _seed_method(len(data)), data, steps=24)  # 2 batches, seen 12 times under new augmentations
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.1


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    data = open_images(SAMPLE / "train", subset=64, seed=0)
    straight = _seed_method(len(data))
    _run(tmp_path / "a", straight, data, steps=6)

    crashed = _seed_method(len(data))
    original = crashed.after_step

    def crash_at_step_5(step, total):
        original(step, total)
        if step == 4:
            raise RuntimeError("simulated crash")

    crashed.after_step = crash_at_step_5
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "b", crashed, data, steps=6)
    resumed = _seed_method(len(data))  # a fresh process would start from scratch like this
    result = _run(tmp_path / "b", resumed, data, steps=6, resume=True)
    assert result.steps == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_dataset_smaller_than_a_batch_is_refused(tmp_path):
    data = open_images(SAMPLE / "train", subset=8, seed=0)
    with pytest.raises(DataError, match="fewer than one batch of 16"):
        _run(tmp_path, _seed_method(64), data, steps=2)


def test_queue_not_smaller_than_dataset_is_refused():
    with pytest.raises(DataError, match="not smaller than the 32 training images"):
        Seed(build_backbone("alexnet", 32), FrozenTeacher(build_backbone("alexnet", 32), CPU), {"queue": 32}, 32)
    with pytest.raises(DataError, match="teacher.options.queue"):
        MoCo(build_backbone("alexnet", 32), {"queue": 100}, 50)


def test_nan_loss_stops_with_the_step_and_keeps_the_resume_point(tmp_path):
    data = open_images(SAMPLE / "train", subset=64, seed=0)
    method = _seed_method(len(data))
    step_fn = method.training_step
    calls = {"n": 0}

    def poisoned(batch):
        calls["n"] += 1
        out = step_fn(batch)
        return {"loss": out["loss"] * float("nan")} if calls["n"] == 3 else out

    method.training_step = poisoned
    with pytest.raises(TrainingError, match="at step 3"):
        _run(tmp_path, method, data, steps=6)
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["step"] == 2
