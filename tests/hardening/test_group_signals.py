"""SIGTERM to a whole process group outside training, as `timeout`, Slurm, Kubernetes and systemd send it:
DataLoader workers ignore it and the stage stops with one line (training: test_kill_resume)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import yaml
from process_kit import children, error_lines, finish, under_timeout, wait_until
from sample_kit import SAMPLE, tiny_recipe_dict

from kt_edge.data import workers
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import save_backbone


def test_eval_with_workers_stops_in_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            tiny_recipe_dict(
                tmp_path / "runs", data={"workers": 2, "train": {"path": str(SAMPLE / "train"), "subset": 1000}}
            )
        )
    )
    save_backbone(build_backbone("resnet18", 32), tmp_path / "runs" / "tiny" / "teacher")
    scheduled = under_timeout("eval", recipe)
    main = wait_until(lambda: children(scheduled.pid), "the kt-edge process", scheduled)[0]
    wait_until(lambda: len(children(main)) == 2, "DataLoader workers embedding the data", scheduled)
    scheduled.send_signal(signal.SIGTERM)  # timeout sends it on to kt-edge, then to the whole group
    code, err = finish(scheduled)
    assert code == 130, err
    assert error_lines(err) == [
        "error: stopped by SIGTERM; finished work (whole artifacts, feature shards) is "
        "kept: run the same command again to go on"
    ], err
    assert not (tmp_path / "runs" / "tiny" / "eval" / "results.json").exists()


def _init_late(ready) -> None:
    """A worker whose ``worker_init_fn`` runs only after a stop signal has arrived."""
    time.sleep(1.0)
    workers.take_stop_signals(0)
    time.sleep(0.5)
    ready.set()


@pytest.mark.parametrize("stop", workers.STOP_SIGNALS)
def test_a_stop_signal_from_anyone_but_the_main_process_is_dropped_even_before_worker_init(stop):
    """The eval test above once failed when the group's SIGTERM reached a worker before its worker_init_fn."""
    context = workers.worker_options(1)["multiprocessing_context"]
    ready = context.Event()
    worker = context.Process(target=_init_late, args=(ready,))
    worker.start()
    assert stop not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the main process still hears it
    subprocess.run(["kill", f"-{stop.name[3:]}", str(worker.pid)], check=True)  # as a scheduler would
    worker.join(10)
    assert worker.exitcode == 0 and ready.is_set()


def test_the_main_process_sigterm_ends_a_worker_cleanly():
    context = workers.worker_options(1)["multiprocessing_context"]
    worker = context.Process(target=_init_late, args=(context.Event(),))
    worker.start()
    time.sleep(1.2)
    worker.terminate()  # what multiprocessing's exit handler and torch's shutdown send
    worker.join(10)
    assert worker.exitcode == 0


HOLDS_LIVE_WORKERS = """
import torch
from kt_edge.data.workers import worker_options
loader = torch.utils.data.DataLoader(torch.arange(8), batch_size=2, persistent_workers=True, **worker_options(2))
batches = iter(loader)
next(batches)
print("ready", flush=True)
"""


def test_a_process_that_still_holds_live_workers_exits():
    """Once, a test kept a feed's persistent workers alive to the end: Python's exit handler sent them SIGTERM,
    which they ignore, and waited for them forever."""
    proc = subprocess.run([sys.executable, "-c", HOLDS_LIVE_WORKERS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ready\n", proc.stderr
