"""One command at a time per run directory: a second one is refused with the holder named, a killed holder's
lock is taken over, and under torchrun the lock is rank 0's."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess

import pytest
import yaml
from process_kit import error_lines, finish, kt_edge, wait_until
from sample_kit import SAMPLE, tiny_recipe_dict

from kt_edge import run_lock
from kt_edge.errors import RunDirBusy
from kt_edge.run_dir import RunDir

TEACHER = {
    "arch": "alexnet",
    "method": "moco",
    "options": {"queue": 32, "hidden": 32, "dim": 16},
    "train": {"epochs": 500, "max_steps": 1000, "batch_size": 16, "lr": 0.05, "checkpoint_every": 1000, "log_every": 1},
}


def test_a_second_command_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    recipe, run_dir = tmp_path / "recipe.yaml", tmp_path / "runs" / "tiny"
    recipe.write_text(
        yaml.safe_dump(
            tiny_recipe_dict(
                tmp_path / "runs", teacher=TEACHER, data={"train": {"path": str(SAMPLE / "train"), "subset": 64}}
            )
        )
    )
    first = kt_edge("train-teacher", recipe)
    try:
        wait_until(
            lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size,
            "the first step",
            first,
        )
        code, err = finish(kt_edge("eval", recipe))
        assert code == 1, err
        assert error_lines(err) == [
            f"error: {run_dir} is in use by `kt-edge train-teacher` (PID {first.pid} on "
            f"host {socket.gethostname()}, since {json.loads((run_dir / '.lock').read_text())['since']}): "
            "one command at a time per run directory; wait for it to end or stop it, or "
            "give this run another name"
        ]
        assert first.poll() is None, "the refused command disturbed the first"
        logged = (run_dir / "metrics.jsonl").read_text()
        first.send_signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert [json.loads(line)["step"] for line in logged.splitlines()] == list(range(1, len(logged.splitlines()) + 1))

    code, err = finish(kt_edge("eval", recipe, "-s", "eval.baseline=false"))  # nothing to evaluate: exit 2
    assert (
        f"warning: {run_dir}: took over the lock of `kt-edge train-teacher` (PID {first.pid} on host "
        f"{socket.gethostname()}" in err
    )
    assert code == 2 and "nothing to evaluate" in err, err
    assert not (run_dir / ".lock").exists()  # released at the end


def test_under_torchrun_only_rank_0_holds_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with run_lock.hold(tmp_path, "run"):
        with pytest.raises(RunDirBusy, match=f"in use by `kt-edge run` \\(PID {os.getpid()}"):
            with run_lock.hold(tmp_path, "eval"):
                pass
        monkeypatch.setenv("RANK", "1")  # another rank of the same torchrun job
        with run_lock.hold(tmp_path, "run"):
            assert json.loads(RunDir(tmp_path).lock.read_text())["command"] == "run"  # rank 0's, untouched
    assert not RunDir(tmp_path).lock.exists()


def test_without_flock_the_pid_decides(tmp_path, monkeypatch):
    """Some network filesystems have no flock: a holder alive on this host is respected, a dead one replaced."""

    def no_locks(*_args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    holder = {"command": "distill", "pid": os.getppid(), "host": socket.gethostname()}
    RunDir(tmp_path).lock.write_text(json.dumps(holder))
    with pytest.raises(RunDirBusy, match=f"`kt-edge distill` \\(PID {os.getppid()} on host"):
        with run_lock.hold(tmp_path, "eval"):
            pass
    ended = subprocess.Popen(["true"])
    ended.wait()
    RunDir(tmp_path).lock.write_text(json.dumps({**holder, "pid": ended.pid}))
    with pytest.warns(UserWarning, match=f"took over the lock of `kt-edge distill` \\(PID {ended.pid} "):
        with run_lock.hold(tmp_path, "eval"):
            assert json.loads(RunDir(tmp_path).lock.read_text())["pid"] == os.getpid()
