"""A real training process killed at random steps, resumed each time, ends with the weights of an unkilled run.

SIGKILL gives no warning: whatever the process was doing (a step, writing a resume point) is cut
short, and `--resume` must continue from the last complete resume point. SIGTERM and SIGINT are
the polite stops of a pre-empted machine: a resume point is written at once and the process exits
130 saying how to go on (SIGINT takes the same path; test_training_faults sends it in-process).
Schedulers send SIGTERM to the whole process group, DataLoader workers included, and SIGKILL after
a grace period that a long step may outlast.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from process_kit import alive, children, error_lines, under_timeout, wait_until
from safetensors.torch import load_file
from sample_kit import REPO, SAMPLE, tiny_recipe_dict

from kt_edge.evaluate.report.sections import read_curves

STEPS = 8
TEACHER = {
    "arch": "alexnet",
    "method": "moco",
    "train": {"epochs": 1, "max_steps": STEPS, "batch_size": 16, "lr": 0.05, "checkpoint_every": 2, "log_every": 1},
    "options": {"queue": 32, "hidden": 32, "dim": 16, "momentum": 0.99},
}


def write_recipe(root: Path) -> Path:
    data = tiny_recipe_dict(
        root / "runs", teacher=TEACHER, data={"train": {"path": str(SAMPLE / "train"), "subset": 192}}
    )
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def start(recipe: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the CPU is shared: one thread each runs fastest
    return subprocess.Popen(
        [sys.executable, "-m", "kt_edge", "train-teacher", str(recipe), *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(run_dir: Path) -> dict[int, dict]:
    """The teacher's metrics by step, the later record of a step winning (a resumed run logs some again)."""
    steps = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # cut short by SIGKILL
            if record.get("stage") == "teacher":
                steps[record["step"]] = record
    return steps


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(run_dir), default=0) < step:
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no step {step} within {timeout} s")
        time.sleep(0.02)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def resume_step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "teacher" / "resume.pt", weights_only=True)["step"])


def assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    ours = load_file(run_dir / "teacher" / "model.safetensors")
    theirs = load_file(reference / "teacher" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # every step, redone or not, computed the same loss as the uninterrupted run
    ours_log, theirs_log = logged_steps(run_dir), logged_steps(reference)
    assert sorted(ours_log) == list(range(1, STEPS + 1))
    assert [ours_log[s]["loss"] for s in ours_log] == [theirs_log[s]["loss"] for s in ours_log]
    assert not list((run_dir / "teacher").glob(".*.tmp")), "temp files left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started in the background while the tests below kill theirs."""
    root = tmp_path_factory.mktemp("reference")
    proc = start(write_recipe(root))
    yield lambda: (finish(proc), root / "runs" / "tiny")[1]
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _reference_dir(reference) -> Path:
    run_dir = reference()
    assert (run_dir / "teacher" / "model.json").is_file(), "the reference run did not finish"
    return run_dir


def test_sigkill_at_random_steps_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "runs" / "tiny"
    seed = int(os.environ.get("KT_EDGE_KILL_SEED", time.time_ns()))
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(1, STEPS - 1), 2))
    print(f"KT_EDGE_KILL_SEED={seed}: SIGKILL after steps {kills}")  # shown if the test fails: rerun with it
    for target in kills:
        proc = start(recipe, "--resume")
        wait_for_step(proc, run_dir, target)
        time.sleep(rng.uniform(0, 0.5))  # anywhere in the next step or its resume point
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        # a killed stage is never taken as complete
        assert not (run_dir / "teacher" / "model.json").exists()

    code, err = finish(start(recipe, "--resume"))
    assert code == 0, err
    assert_same_as_reference(run_dir, _reference_dir(reference))


def test_sigterm_writes_a_resume_point_and_exits_130_saying_how_to_resume(tmp_path, reference):
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "runs" / "tiny"
    proc = start(recipe)
    wait_for_step(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 130, err
    stopped = resume_step(run_dir)
    assert 3 <= stopped < STEPS
    assert f"stopped by SIGTERM at step {stopped}/{STEPS}" in err and "--resume" in err
    assert max(logged_steps(run_dir)) == stopped
    assert not (run_dir / "teacher" / "model.json").exists()

    code, err = finish(start(recipe, "--resume"))
    assert code == 0, err
    assert_same_as_reference(run_dir, _reference_dir(reference))


def test_killed_between_the_last_step_and_the_checkpoint_resumes_without_training_again(
    tmp_path, monkeypatch, one_thread
):
    """The one moment a resume point is complete but the stage is not: --resume only writes the checkpoint."""
    from kt_edge.recipe import load_recipe
    from kt_edge.stages import run, teacher

    class Killed(BaseException):
        pass

    def killed(*_args, **_kwargs):
        raise Killed

    recipe = load_recipe(write_recipe(tmp_path), ["teacher.train.max_steps=2"])
    monkeypatch.setattr(teacher, "save_backbone", killed)
    with pytest.raises(Killed):
        run.teacher(recipe)
    monkeypatch.undo()
    out, log = recipe.run_dir / "teacher", recipe.run_dir / "metrics.jsonl"
    assert resume_step(recipe.run_dir) == 2 and not (out / "model.json").exists()
    steps_logged = log.read_text()

    run.teacher(recipe, resume=True)
    assert log.read_text() == steps_logged  # no step was run again
    assert (out / "model.json").is_file()
    written = (out / "model.safetensors").stat().st_mtime_ns
    run.teacher(recipe, resume=True)  # complete: not redone
    assert (out / "model.safetensors").stat().st_mtime_ns == written


def _workers_of(scheduled: subprocess.Popen, run_dir: Path, step: int) -> tuple[int, list[int]]:
    """Under `timeout`: the kt-edge process and its two DataLoader workers, once it has logged ``step``."""
    wait_until(lambda: max(logged_steps(run_dir), default=0) >= step, f"step {step}", scheduled)
    main = wait_until(lambda: children(scheduled.pid), "the kt-edge process", scheduled)[0]

    def two_workers():
        found = children(main)
        return found if len(found) == 2 else None

    return main, wait_until(two_workers, "two workers", scheduled)


def test_sigterm_to_the_process_group_with_workers_stops_in_one_line_and_resumes_to_the_same_result(
    tmp_path, reference
):
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "runs" / "tiny"
    scheduled = under_timeout("train-teacher", recipe, "-s", "data.workers=2")
    _, workers = _workers_of(scheduled, run_dir, 3)
    for worker in workers:  # a worker gets the signal first (or Ctrl-C's SIGINT): it must not die of it
        os.kill(worker, signal.SIGINT)
        os.kill(worker, signal.SIGTERM)
    time.sleep(0.3)
    assert all(alive(worker) for worker in workers)
    scheduled.send_signal(signal.SIGTERM)  # timeout sends it on to kt-edge, then to the whole group
    code, err = finish(scheduled)
    assert code == 130, err
    stopped = resume_step(run_dir)
    assert 3 <= stopped < STEPS and max(logged_steps(run_dir)) == stopped
    assert error_lines(err) == [
        f"error: teacher: stopped by SIGTERM at step {stopped}/{STEPS}; run the same command with --resume to continue"
    ]
    assert not any(alive(worker) for worker in workers)

    with open(run_dir / "metrics.jsonl", "a") as log:
        log.write('{"stage": "teacher", "step": 9')  # half a record, as a kill in the middle of a write leaves
    code, err = finish(start(recipe, "--resume", "-s", "data.workers=2"))
    assert code == 0, err
    assert_same_as_reference(run_dir, _reference_dir(reference))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["stage"] == "teacher" for line in lines)  # the half line was cut off, not glued
    assert [r["step"] for r in read_curves(run_dir / "metrics.jsonl")["teacher"]] == list(range(1, STEPS + 1))


def test_sigkill_following_sigterm_before_the_step_ends_keeps_the_last_resume_point(tmp_path, reference):
    """A step longer than the grace period: SIGKILL lands while the stop is still pending."""
    recipe, run_dir = write_recipe(tmp_path), tmp_path / "runs" / "tiny"
    scheduled = under_timeout("train-teacher", recipe, "-s", "data.workers=2")
    main, workers = _workers_of(scheduled, run_dir, 3)
    scheduled.send_signal(signal.SIGTERM)
    os.kill(main, signal.SIGKILL)  # the grace period is over
    code, _ = finish(scheduled)
    assert code in (-signal.SIGKILL, 128 + signal.SIGKILL)  # timeout passes the signal on, or its number
    # the workers ignore SIGTERM, but not the end of their main process
    wait_until(lambda: not any(alive(worker) for worker in workers), "the workers' end", timeout=30)
    assert resume_step(run_dir) >= 2 and not (run_dir / "teacher" / "model.json").exists()

    code, err = finish(start(recipe, "--resume"))
    assert code == 0, err
    assert "took over the lock of `kt-edge train-teacher`" in err  # the killed command could not release it
    assert_same_as_reference(run_dir, _reference_dir(reference))
