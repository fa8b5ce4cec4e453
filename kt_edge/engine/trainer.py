"""The training loop every teacher and distillation method runs on.

A *method* keeps the contract of ``kt_edge.engine.method.Method``: ``train_transform(image_size)``,
``training_step(batch) -> dict`` (with a ``loss`` tensor), ``after_step(step, total_steps)`` for
momentum encoders and queues, and a ``backbone`` attribute: the network the stage hands on.

The loop owns the rest, written once: seeding, device, bf16 autocast, the cosine schedule,
progress, ``metrics.jsonl``, resume points written atomically, SIGTERM/SIGINT handling and a
NaN guard.  Every sample's augmentation and the batch order are functions of (seed, epoch,
index) (``kt_edge.data.feed``), so a resumed run equals an uninterrupted one.

The hot loop never waits for the GPU: scalars are read (one host synchronisation) every
``log_every`` steps, and the decisions that need them (the NaN guard, a stop signal, a resume
point due by time) are taken there, agreed by every rank in the same all-reduce.  Under torchrun
the step runs in DistributedDataParallel, ``cfg.batch_size`` is the global batch (each rank takes a
contiguous slice of it), BatchNorm is synchronised where the method's official code does it, and
rank 0 alone writes files.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kt_edge import atomic
from kt_edge.data.feed import TrainingFeed
from kt_edge.engine import distributed
from kt_edge.engine import resume as resume_point
from kt_edge.engine.metrics import MetricsLog
from kt_edge.engine.precision import autocast
from kt_edge.engine.resume import RESUME
from kt_edge.errors import DataError, Interrupted, KtEdgeError, TrainingError

__all__ = ["RESUME", "TrainResult", "lr_at", "make_optimizer", "train"]
clock = time.monotonic  # of the time-based resume points


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, cfg, device: torch.device | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW; the fused (single-kernel) implementations on CUDA."""
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def networks(method: torch.nn.Module) -> list[torch.nn.Module]:
    """The networks a step runs: the method's sub-modules with weights, and a frozen teacher's."""
    found = [child for child in method.children() if any(True for _ in child.parameters())]
    teacher_networks = getattr(getattr(method, "teacher", None), "networks", None)
    return found + (teacher_networks() if teacher_networks else [])


def use_sync_batchnorm(cfg, method: torch.nn.Module, device: torch.device) -> bool:
    """Whether BatchNorm statistics span every rank: ``train.sync_batchnorm``, ``auto`` meaning the method's own
    choice (``sync_batchnorm = True`` on the class) on GPUs. torch's SyncBatchNorm runs on GPUs only."""
    if not distributed.active():
        return False
    if cfg.sync_batchnorm == "auto":
        return device.type == "cuda" and getattr(method, "sync_batchnorm", False)
    if cfg.sync_batchnorm and device.type != "cuda":
        raise KtEdgeError(
            "train.sync_batchnorm true needs GPUs (torch's SyncBatchNorm runs on CUDA only); "
            "set it to false or auto for a CPU run"
        )
    return bool(cfg.sync_batchnorm)


@contextmanager
def stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only). A signal that came
    after the loop's last check (the final save, the workers' shutdown) is passed on to the handler before."""
    flag = {"signal": None}

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    unheard = None
    try:
        yield flag
        unheard = flag["signal"]  # the loop ended normally, so it never acted on it
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if unheard is not None:
        signal.raise_signal(signal.Signals[unheard])


def train(
    method: torch.nn.Module,
    dataset,
    cfg,
    out_dir: Path,
    *,
    stage: str,
    seed: int,
    device: torch.device,
    image_size: int,
    workers: int = 0,
    resume: bool = False,
    fingerprint: str = "",
    metrics_path: Path | None = None,
    augment: str = "per_sample",
) -> TrainResult:
    """Train ``method`` on ``dataset`` per ``cfg`` (a recipe ``TrainConfig``); resume points go to ``out_dir``.

    ``fingerprint`` names the stage's inputs; a resume point made from other inputs, or from another number
    of images (files added to or removed from the folder), is refused.
    ``augment`` is the data path: ``per_sample`` or ``batched`` (``dataset`` then holds a uint8 ``array``).
    """
    out_dir, main = Path(out_dir), distributed.is_main()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_temps(out_dir)  # a resume point half-written when the last run was killed
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"{stage}: {len(dataset)} images is fewer than one batch of {cfg.batch_size}; "
            f"lower {stage}.train.batch_size"
        )
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.epochs * steps_per_epoch, cfg.max_steps)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    # The networks, on the device, in the layout and synchronisation the run asks for.
    torch.manual_seed(seed)
    method.to(device)
    memory_format = torch.channels_last if device.type == "cuda" and cfg.channels_last else torch.contiguous_format
    for network in networks(method):
        network.to(memory_format=memory_format)
    if use_sync_batchnorm(cfg, method, device):
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    optimizer = make_optimizer([p for p in method.parameters() if p.requires_grad], cfg, device)

    # Where to start: step 0, or the resume point of a stopped run of the same inputs.
    step, path = 0, out_dir / RESUME
    if resume and path.is_file():
        state = resume_point.read(path, fingerprint, len(dataset))
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        resume_point.restore_rng(state, device)
        step = int(state["step"])
    if cfg.compile:
        for network in networks(method):
            network.compile()  # in place: state-dict keys stay as they were
    step_fn = distributed.step_function(method, device)
    feed = TrainingFeed(
        dataset,
        method.train_transform(image_size),
        augment,
        seed=seed,
        batch_size=cfg.batch_size,
        image_size=image_size,
        device=device,
        workers=workers,
        memory_format=memory_format,
    )

    def save():
        resume_point.check_finite(method, stage, step, out_dir)  # on every rank: all stop together
        if main:
            resume_point.write(path, method, optimizer, step, device, fingerprint, len(dataset))

    log = MetricsLog(metrics_path) if metrics_path and main else None
    progress = Progress(
        TextColumn(f"[bold]{stage}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        disable=not main,
    )
    started, saved = time.monotonic(), clock()
    loss_value = float("nan")
    try:
        with stop_signals() as stop, progress:
            task = progress.add_task(stage, total=total, completed=step, loss=float("nan"))
            method.train()
            while step < total:
                epoch, offset = divmod(step, steps_per_epoch)
                for batch in feed.epoch(epoch, offset * cfg.batch_size):
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step, total, warmup, cfg.lr)
                    with autocast(device, cfg.amp):
                        out = step_fn(batch)
                    optimizer.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    optimizer.step()
                    method.after_step(step, total)
                    step += 1

                    # Every log_every steps (and at the end, a step-based resume point, or a stop of one
                    # process): read the scalars and take the decisions that need the host.
                    stopping = stop["signal"] is not None
                    step_due = cfg.checkpoint_every is not None and step % cfg.checkpoint_every == 0
                    if not (
                        step % cfg.log_every == 0
                        or step == total
                        or step_due
                        or (stopping and not distributed.active())
                    ):
                        continue
                    time_due = cfg.checkpoint_every is None and clock() - saved >= 60 * cfg.checkpoint_minutes
                    scalars, flags = distributed.agree(out, {"stop": stopping, "checkpoint": main and time_due})
                    loss_value = scalars["loss"]
                    if not math.isfinite(loss_value):
                        raise TrainingError(
                            f"{stage}: loss became {loss_value} at step {step}; "
                            f"the last resume point in {out_dir} is kept"
                        )
                    progress.update(task, completed=step, loss=loss_value)
                    if log:
                        log.write(
                            {
                                "stage": stage,
                                "step": step,
                                "epoch": epoch,
                                "lr": optimizer.param_groups[0]["lr"],
                                "time": time.time(),
                                **scalars,
                            }
                        )
                    if step_due or flags["checkpoint"] or flags["stop"] or step == total:
                        save()
                        saved = clock()
                    if flags["stop"]:
                        raise Interrupted(
                            f"{stage}: stopped by {stop['signal'] or 'a signal to another rank'} "
                            f"at step {step}/{total}; run the same command with --resume to continue"
                        )
                    if step >= total:
                        break
    finally:
        if log:
            log.close()
    return TrainResult(steps=step, final_loss=loss_value, seconds=time.monotonic() - started)
