import json
import signal

import pytest
import torch
from sample_kit import SAMPLE, crashing_at

from kt_edge.data.sources import open_images
from kt_edge.engine.trainer import stop_signals, train
from kt_edge.errors import DataError, TrainingError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.recipe import TrainConfig
from kt_edge.teachers.moco import MoCo
from kt_edge.transfer.seed import Seed

CPU = torch.device("cpu")
DISTILL = dict(stage="distill", seed=0, device=CPU, image_size=32)  # how every run here trains


def _seed_method(n_images):
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_backbone("alexnet", 32), CPU)
    return Seed(build_backbone("alexnet", 32), teacher, {"queue": 16, "hidden": 64}, n_images)


def _run(tmp_path, method, data, steps, resume=False):
    cfg = TrainConfig(
        epochs=100, max_steps=steps, batch_size=16, optimizer="adamw", lr=2e-3, checkpoint_every=2, log_every=1
    )
    return train(method, data, cfg, tmp_path, resume=resume, metrics_path=tmp_path / "metrics.jsonl", **DISTILL)


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

    crashed = crashing_at(_seed_method(len(data)), step=4)
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


def _cfg(**changes):
    base = dict(epochs=100, batch_size=16, optimizer="adamw", lr=2e-3)
    return TrainConfig(**{**base, **changes})


def test_the_host_reads_scalars_only_every_log_every_steps(tmp_path, monkeypatch, one_thread):
    """Between logged steps the loop never waits for the device: no scalar is read, no collective runs."""
    from kt_edge.engine import distributed

    data = open_images(SAMPLE / "train", subset=64, seed=0)
    reads = []
    agree = distributed.agree
    monkeypatch.setattr(distributed, "agree", lambda scalars, flags: reads.append(1) or agree(scalars, flags))
    train(
        _seed_method(len(data)),
        data,
        _cfg(max_steps=7, log_every=3),
        tmp_path,
        metrics_path=tmp_path / "metrics.jsonl",
        **DISTILL,
    )
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 7] and len(reads) == 3  # every third step, and the last


def test_resume_points_are_time_based_unless_steps_are_given(tmp_path, monkeypatch, one_thread):
    from kt_edge.engine import resume, trainer

    data = open_images(SAMPLE / "train", subset=32, seed=0)
    written = []
    write = resume.write
    monkeypatch.setattr(
        resume, "write", lambda path, method, opt, step, *a: written.append(step) or write(path, method, opt, step, *a)
    )
    clock = {"now": 0.0}

    def tick():
        clock["now"] += 40.0  # each read of the clock: 40 s later
        return clock["now"]

    monkeypatch.setattr(trainer, "clock", tick)

    def resume_points(name: str, **cfg) -> list[int]:
        written.clear()
        method = _seed_method(len(data))
        train(method, data, _cfg(max_steps=8, **cfg), tmp_path / name, **DISTILL)
        return list(written)

    # the clock is read at each logged step: a minute is due every other one
    assert resume_points("a", log_every=2, checkpoint_minutes=1.0) == [4, 8]
    assert resume_points("b", log_every=2, checkpoint_minutes=60.0) == [8]  # not due within the run: only the end
    assert resume_points("c", log_every=4, checkpoint_every=3) == [3, 6, 8]


def test_workers_live_across_epochs_and_change_no_result(tmp_path, monkeypatch):
    """persistent_workers: one DataLoader, its workers started once, for three epochs; the same weights as
    augmenting in the main process, because every view is keyed by (seed, epoch, index)."""
    from kt_edge.data import feed

    data = open_images(SAMPLE / "train", subset=32, seed=0)
    loaders = []
    monkeypatch.setattr(feed.torch.utils.data, "DataLoader", _counting(feed.torch.utils.data.DataLoader, loaders))
    results = {}
    for workers in (0, 2):
        method = _seed_method(len(data))
        train(method, data, _cfg(max_steps=6, log_every=6), tmp_path / str(workers), workers=workers, **DISTILL)
        results[workers] = method.state_dict()
    assert [loader.persistent_workers for loader in loaders] == [False, True]  # one loader per run, 3 epochs each
    for name, value in results[0].items():
        assert torch.equal(value, results[2][name]), name


def _counting(cls, made):
    class Counted(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    return Counted


def test_a_gpu_resume_point_carries_the_cuda_generator(monkeypatch):
    from kt_edge.engine import resume

    cuda = torch.device("cuda", 0)
    state = torch.ByteTensor([1, 2, 3])
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda value, device: restored.append((value, device)))
    saved = resume.rng_state(cuda)
    assert torch.equal(saved["cuda_rng"], state) and torch.equal(saved["rng"], torch.get_rng_state())
    resume.restore_rng(saved, cuda)
    assert restored == [(state, cuda)]
    assert "cuda_rng" not in resume.rng_state(CPU)


def test_sync_batchnorm_follows_the_method_on_gpus_under_torchrun(monkeypatch):
    from kt_edge.engine import distributed
    from kt_edge.engine.trainer import use_sync_batchnorm
    from kt_edge.errors import KtEdgeError
    from kt_edge.teachers.simclr import SimCLR

    simclr, moco = SimCLR.__new__(SimCLR), MoCo.__new__(MoCo)
    cuda = torch.device("cuda", 0)
    assert not use_sync_batchnorm(_cfg(), simclr, cuda)  # one process: nothing to synchronise
    monkeypatch.setattr(distributed, "active", lambda: True)
    assert use_sync_batchnorm(_cfg(), simclr, cuda) and not use_sync_batchnorm(_cfg(), moco, cuda)  # shuffle BN
    assert not use_sync_batchnorm(_cfg(), simclr, CPU)  # torch's SyncBatchNorm runs on GPUs only
    assert use_sync_batchnorm(_cfg(sync_batchnorm=True), moco, cuda)
    assert not use_sync_batchnorm(_cfg(sync_batchnorm=False), simclr, cuda)
    with pytest.raises(KtEdgeError, match="sync_batchnorm true needs GPUs"):
        use_sync_batchnorm(_cfg(sync_batchnorm=True), simclr, CPU)


def test_a_stop_signal_the_loop_could_not_act_on_is_passed_on():
    """Once, a SIGTERM during a run's final save was swallowed: the campaign ran on past its budget."""
    heard = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: heard.append(signum))
    try:
        with stop_signals() as flag:
            signal.raise_signal(signal.SIGTERM)  # after the loop's last check
            assert flag["signal"] == "SIGTERM" and heard == []
        assert heard == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
