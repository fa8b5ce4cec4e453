"""Training faults: a NaN loss or inf weights stop with the step and keep the last good resume point; a signal
stops cleanly; a resume point that is corrupt, planted or made for other inputs is refused, never run."""

from __future__ import annotations

import os
import pickle
import re
import signal
import time

import pytest
import torch
import yaml
from sample_kit import SAMPLE, tiny_recipe_dict
from typer.testing import CliRunner

from kt_edge.cli import app
from kt_edge.data.sources import open_images
from kt_edge.engine.trainer import RESUME, train
from kt_edge.errors import CheckpointError, Interrupted, KtEdgeError, TrainingError
from kt_edge.models.backbones import build_backbone
from kt_edge.recipe import TrainConfig
from kt_edge.teachers.moco import MoCo

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _method(n_images: int) -> MoCo:
    torch.manual_seed(0)
    return MoCo(build_backbone("alexnet", 32), {"queue": 16, "hidden": 32, "dim": 16}, n_images)


def _train(out, method, data, steps=4, resume=False, fingerprint=""):
    cfg = TrainConfig(epochs=10, max_steps=steps, batch_size=16, lr=0.05, checkpoint_every=1, log_every=1)
    return train(
        method,
        data,
        cfg,
        out,
        stage="teacher",
        seed=0,
        device=CPU,
        image_size=32,
        resume=resume,
        fingerprint=fingerprint,
    )


@pytest.fixture(scope="module")
def data():
    return open_images(SAMPLE / "train", subset=48, seed=0)


def _finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def _recipe(tmp_path, lr: float):
    teacher = {
        "arch": "alexnet",
        "method": "moco",
        "options": {"queue": 32, "hidden": 32, "dim": 16},
        "train": {"epochs": 1, "max_steps": 6, "batch_size": 16, "lr": lr, "checkpoint_every": 1, "log_every": 1},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "runs", teacher=teacher)))
    return recipe, tmp_path / "runs" / "tiny" / "teacher"


def test_a_diverging_run_stops_with_the_step_and_keeps_the_last_good_resume_point(tmp_path):
    recipe, out = _recipe(tmp_path, lr=1e30)
    result = CliRunner().invoke(app, ["train-teacher", str(recipe)])
    assert result.exit_code == 1, result.output
    found = re.search(r"error: teacher: (loss became nan|the weights became inf or NaN) at step (\d+)", result.output)
    assert found, result.output
    assert "last resume point" in result.output and "Traceback" not in result.output
    state = torch.load(out / RESUME, weights_only=True)
    assert state["step"] < int(found.group(2)) and _finite(state["method"])
    assert not (out / "model.json").exists()  # the stage is not complete


def test_weights_turning_inf_stop_before_they_reach_a_resume_point(tmp_path, data):
    method = _method(len(data))
    original = method.after_step

    def corrupt_at_step_3(step, total):
        original(step, total)
        if step == 2:
            with torch.no_grad():
                next(method.backbone.parameters()).view(-1)[0] = float("inf")

    method.after_step = corrupt_at_step_3
    with pytest.raises(TrainingError, match="weights became inf or NaN at step 3"):
        _train(tmp_path, method, data)
    state = torch.load(tmp_path / RESUME, weights_only=True)
    assert state["step"] == 2 and _finite(state["method"])


@pytest.fixture
def sigint_raises():
    """Ctrl-C as in a terminal, even where the test runner was started with SIGINT ignored (a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_sigint_writes_a_resume_point_and_stops(tmp_path, data, sigint_raises):
    method = _method(len(data))
    original = method.after_step

    def interrupt_at_step_3(step, total):
        original(step, total)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    method.after_step = interrupt_at_step_3
    with pytest.raises(Interrupted, match=r"stopped by SIGINT at step 3/4; run the same command with --resume") as exc:
        _train(tmp_path, method, data)
    assert exc.value.exit_code == 130
    assert torch.load(tmp_path / RESUME, weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_outside_training_stops_a_stage_with_one_line_and_130(
    tmp_path, tiny_recipe, monkeypatch, signum, sigint_raises
):
    from typer.testing import CliRunner

    from kt_edge.cli import app
    from kt_edge.stages import run

    def stopped_midway(recipe, models):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the stage")

    monkeypatch.setattr(run, "evaluate", stopped_midway)
    result = CliRunner().invoke(app, ["eval", str(tiny_recipe())])
    assert result.exit_code == 130
    assert f"stopped by {signal.Signals(signum).name}; finished work" in result.output
    assert "Traceback" not in result.output
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is given back


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_resume_point_is_refused_without_running_it(tmp_path):
    recipe, out = _recipe(tmp_path, lr=0.05)
    marker = tmp_path / "pwned"
    out.mkdir(parents=True)
    torch.save(
        {"method": _Evil(marker), "optimizer": {}, "rng": torch.get_rng_state(), "step": 1, "fingerprint": ""},
        out / RESUME,
    )
    result = CliRunner().invoke(app, ["train-teacher", str(recipe), "--resume"])
    assert result.exit_code == 2, result.output
    # the global it would have called, and that it will not be loaded: not torch's advice to load it unsafely
    assert (
        "refused, the pickle holds more than weights: it would call posix.system; kt-edge will not load it"
        in result.output
        and "delete it" in result.output
    )
    assert "weights_only=False" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not marker.exists()
    torch.load(out / RESUME, weights_only=False)  # what loading it without weights_only would have done
    assert marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip or a pickle", pickle.dumps([1, 2, 3], protocol=2)])
def test_a_corrupt_resume_point_is_a_clear_error(tmp_path, data, content):
    (tmp_path / RESUME).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{RESUME}: not a"):
        _train(tmp_path, _method(len(data)), data, resume=True)


def test_a_resume_point_for_other_inputs_is_refused(tmp_path, data):
    _train(tmp_path, _method(len(data)), data, steps=1, fingerprint="recipe-a")
    with pytest.raises(KtEdgeError, match="written for other inputs"):
        _train(tmp_path, _method(len(data)), data, steps=2, resume=True, fingerprint="recipe-b")


def test_a_resume_point_for_another_number_of_images_is_refused(tmp_path, data):
    """Files added to the folder between the kill and --resume would shift every batch: refused, not mixed in."""
    _train(tmp_path, _method(len(data)), data, steps=1)
    fewer = open_images(SAMPLE / "train", subset=32, seed=0)
    with pytest.raises(KtEdgeError, match="the recipe or the images changed"):
        _train(tmp_path, _method(len(fewer)), fewer, steps=2, resume=True)


def test_a_stage_resumed_with_no_step_left_writes_strict_json(tmp_path):
    """Killed between the last resume point and the end: the resumed stage ran no step, so it has no loss to
    record; model.json says null (JSON has no NaN)."""
    import json

    recipe, out = _recipe(tmp_path, lr=0.05)
    assert CliRunner().invoke(app, ["train-teacher", str(recipe), "-s", "teacher.train.max_steps=2"]).exit_code == 0
    for name in ("model.json", "model.safetensors", ".done"):  # what the kill left: the resume point alone
        (out / name).unlink()
    result = CliRunner().invoke(app, ["train-teacher", str(recipe), "-s", "teacher.train.max_steps=2", "--resume"])
    assert result.exit_code == 0, result.output

    def not_json(constant):
        raise AssertionError(f"model.json holds {constant}, which is not JSON")

    card = json.loads((out / "model.json").read_text(), parse_constant=not_json)
    assert card["steps"] == 2 and card["final_loss"] is None
