"""The training loop every teacher and distillation method runs on.

A *method* is an ``nn.Module`` with ``train_transform(image_size)``, ``training_step(batch) ->
dict`` (with a ``loss`` tensor) and optionally ``after_step(step, total_steps)`` for momentum
encoders and queues, and a ``backbone`` attribute: the network the stage hands on.

The loop owns the rest, written once: seeding, device, bf16 autocast, the cosine schedule,
progress, ``metrics.jsonl``, resume points written atomically, SIGTERM/SIGINT handling and a
NaN guard.  Every sample's augmentation and the batch order are functions of (seed, epoch,
index), so a resumed run equals an uninterrupted one.

Images reach the method by one of two paths: ``per_sample`` (DataLoader workers decode and augment
each image with the method's ``train_transform``) or ``batched`` (uint8 rows of a cached array go to
the device, where ``BatchAugment`` builds the same views a whole batch at a time).  Under torchrun
the step runs in DistributedDataParallel, ``cfg.batch_size`` is the global batch (each rank takes a
contiguous slice of it), logged scalars are averaged over ranks and rank 0 alone writes files.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from kt_edge import atomic
from kt_edge.data.augment import SeededViews
from kt_edge.data.feed import ArrayBatches
from kt_edge.data.gpu_augment import BatchAugment
from kt_edge.data.workers import ignore_stop_signals
from kt_edge.engine import distributed
from kt_edge.engine.metrics import MetricsLog
from kt_edge.errors import CheckpointError, DataError, Interrupted, KtEdgeError, TrainingError
from kt_edge.models.checkpoint import load_torch_file
from kt_edge.models.frozen import FrozenTeacher

RESUME = "resume.pt"


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, starting part-way through when resuming.

    With ``world`` ranks, rank r takes the r-th contiguous slice of every global batch of
    ``batch_size``, so the ranks together see exactly the batches one process would.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, *, rank: int = 0, world: int = 1,
                 batch_size: int = 1):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world, self.batch_size = rank, world, batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=generator)[self.start:]
        if self.world > 1:
            order = order[: len(order) // self.batch_size * self.batch_size]
            order = order.view(-1, self.world, self.batch_size // self.world)[:, self.rank].reshape(-1)
        return iter(order.tolist())

    def __len__(self) -> int:
        if self.world > 1:
            return (self.n - self.start) // self.batch_size * (self.batch_size // self.world)
        return self.n - self.start


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
    """The networks a step runs: the method's sub-modules with weights, and a frozen teacher's model."""
    found = [child for child in method.children() if any(True for _ in child.parameters())]
    teacher = getattr(method, "teacher", None)
    if isinstance(teacher, FrozenTeacher):
        found.append(teacher.model)
    return found


@contextmanager
def stop_signals():
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""
    flag = {"signal": None}

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _to(batch, device, memory_format=torch.contiguous_format):
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.contiguous(memory_format=memory_format) if batch.ndim == 4 else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(item, device, memory_format) for item in batch)
    return batch


def _read_resume_point(path: Path) -> dict:
    """A resume point, loaded with weights_only=True: a planted pickle cannot run code."""
    state = load_torch_file(path, "resume point", advice="delete it and run without --resume")
    keys = {"method", "optimizer", "rng", "step", "fingerprint"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise CheckpointError(f"{path}: not a kt-edge resume point (expected the keys {', '.join(sorted(keys))})")
    return state


def train(method: torch.nn.Module, dataset, cfg, out_dir: Path, *, stage: str, seed: int,
          device: torch.device, image_size: int, workers: int = 0, resume: bool = False,
          fingerprint: str = "", metrics_path: Path | None = None, augment: str = "per_sample") -> TrainResult:
    """Train ``method`` on ``dataset`` per ``cfg`` (a recipe ``TrainConfig``); resume points go to ``out_dir``.

    ``fingerprint`` names the stage's inputs; a resume point made from other inputs, or from another number
    of images (files added to or removed from the folder), is refused.
    ``augment`` is the data path: ``per_sample`` or ``batched`` (``dataset`` then holds a uint8 ``array``).
    """
    out_dir = Path(out_dir)
    main, rank, world = distributed.is_main(), distributed.rank(), distributed.world_size()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_temps(out_dir)  # a resume point half-written when the last run was killed
    local_batch = distributed.local_batch_size(cfg.batch_size, f"{stage}.train.batch_size")
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{stage}: {len(dataset)} images is fewer than one batch of {cfg.batch_size}; "
                        f"lower {stage}.train.batch_size")
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    torch.manual_seed(seed)
    method.to(device)
    memory_format = torch.channels_last if device.type == "cuda" and cfg.channels_last else torch.contiguous_format
    if memory_format is torch.channels_last:
        for network in networks(method):
            network.to(memory_format=memory_format)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, device)
    step = 0
    resume_path = out_dir / RESUME
    if resume and resume_path.is_file():
        state = _read_resume_point(resume_path)
        if state.get("fingerprint", "") != fingerprint or state.get("images", len(dataset)) != len(dataset):
            raise KtEdgeError(f"{resume_path} was written for other inputs (the recipe or the images changed); "
                              "run without --resume to start this stage again")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])
    if cfg.compile:
        for network in networks(method):
            network.compile()  # in place: state-dict keys stay as they were
    step_fn = distributed.step_function(method, device)

    if augment == "batched":
        batched = BatchAugment.from_transform(method.train_transform(image_size))
        views = ArrayBatches(dataset, batched, seed, image_size)
    elif augment == "per_sample":
        views = SeededViews(dataset.with_transform(method.train_transform(image_size)), seed)
    else:
        raise ValueError(f"augment must be 'per_sample' or 'batched', got {augment!r}")

    def epoch_batches(epoch: int, start: int):
        """This rank's batches of one epoch from sample ``start`` on, on the device."""
        views.epoch = epoch
        sampler = EpochSampler(len(views), seed, epoch, start, rank=rank, world=world, batch_size=cfg.batch_size)
        common = dict(num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(seed + epoch))  # keeps the global RNG untouched
        if augment == "per_sample":
            loader = torch.utils.data.DataLoader(views, batch_size=local_batch, drop_last=True, sampler=sampler,
                                                 **common)
            for batch in loader:
                yield _to(batch, device, memory_format)
            return
        loader = torch.utils.data.DataLoader(
            views, batch_size=None, sampler=torch.utils.data.BatchSampler(sampler, local_batch, drop_last=True),
            **common)
        for pixels, uniforms, labels in loader:
            images = batched(pixels.to(device, non_blocking=True), uniforms.to(device, non_blocking=True))
            yield _to(images, device, memory_format), labels.to(device, non_blocking=True)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp
                else nullcontext())
    log = MetricsLog(metrics_path) if metrics_path and main else None
    started, loss_value = time.perf_counter(), float("nan")

    def save_resume_point():
        if not all(bool(torch.isfinite(t).all()) for t in method.state_dict().values() if t.is_floating_point()):
            raise TrainingError(f"{stage}: the weights became inf or NaN at step {step}; "
                                f"the last resume point in {out_dir} is kept")
        if not main:
            return
        with atomic.atomic_file(resume_path) as handle:
            torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "step": step,
                        "fingerprint": fingerprint, "images": len(dataset)}, handle)

    progress = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=False,
                        disable=not main)
    try:
        with stop_signals() as stop, progress:
            task = progress.add_task(stage, total=total, completed=step, loss=float("nan"))
            method.train()
            while step < total:
                epoch, offset = divmod(step, steps_per_epoch)
                for batch in epoch_batches(epoch, offset * cfg.batch_size):
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step, total, warmup, cfg.lr)
                    with autocast:
                        out = step_fn(batch)
                    scalars = distributed.mean_scalars(out)
                    loss_value = scalars["loss"]
                    if not math.isfinite(loss_value):
                        raise TrainingError(f"{stage}: loss became {loss_value} at step {step + 1}; "
                                            f"the last resume point in {out_dir} is kept")
                    optimizer.zero_grad(set_to_none=True)
                    out["loss"].backward()
                    optimizer.step()
                    if hasattr(method, "after_step"):
                        method.after_step(step, total)
                    step += 1
                    progress.update(task, completed=step, loss=loss_value)
                    if log:
                        record = {"stage": stage, "step": step, "epoch": epoch,
                                  "lr": optimizer.param_groups[0]["lr"], "time": time.time()}
                        record.update(scalars)
                        log.write(record)
                    if step % cfg.checkpoint_every == 0 or step == total:
                        save_resume_point()
                    if distributed.any_rank(bool(stop["signal"])):
                        save_resume_point()
                        raise Interrupted(f"{stage}: stopped by {stop['signal'] or 'a signal to another rank'} "
                                          f"at step {step}/{total}; run the same command with --resume to continue")
                    if step >= total:
                        break
    finally:
        if log:
            log.close()
    return TrainResult(steps=step, final_loss=loss_value, seconds=time.perf_counter() - started)
