"""The training loop every teacher and distillation method runs on.

A *method* is an ``nn.Module`` with ``train_transform(image_size)``, ``training_step(batch) ->
dict`` (with a ``loss`` tensor) and optionally ``after_step(step, total_steps)`` for momentum
encoders and queues, and a ``backbone`` attribute: the network the stage hands on.

The loop owns the rest, written once: seeding, device, bf16 autocast, the cosine schedule,
progress, ``metrics.jsonl``, resume points written atomically, SIGTERM/SIGINT handling and a
NaN guard.  Every sample's augmentation and the batch order are functions of (seed, epoch,
index), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
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
from kt_edge.errors import DataError, KtEdgeError, TrainingError

RESUME = "resume.pt"


class Interrupted(KtEdgeError):
    """SIGINT or SIGTERM: a resume point was written."""

    exit_code = 130


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise KtEdgeError("device 'cuda' asked for, but torch sees no GPU; use device: auto or cpu")
    return torch.device(name)


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, starting part-way through when resuming."""

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator)[self.start:].tolist())

    def __len__(self) -> int:
        return self.n - self.start


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(item, device) for item in batch)
    return batch


def train(method: torch.nn.Module, dataset, cfg, out_dir: Path, *, stage: str, seed: int,
          device: torch.device, image_size: int, workers: int = 0, resume: bool = False,
          fingerprint: str = "", metrics_path: Path | None = None) -> TrainResult:
    """Train ``method`` on ``dataset`` per ``cfg`` (a recipe ``TrainConfig``); resume points go to ``out_dir``.

    ``fingerprint`` names the stage's inputs; a resume point made from other inputs is refused.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    step = 0
    resume_path = out_dir / RESUME
    if resume and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if state.get("fingerprint", "") != fingerprint:
            raise KtEdgeError(f"{resume_path} was written for other inputs (the recipe changed); "
                              "run without --resume to start this stage again")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        step = int(state["step"])

    views = SeededViews(dataset.with_transform(method.train_transform(image_size)), seed)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp
                else nullcontext())
    log = open(metrics_path, "a") if metrics_path else None
    started, loss_value = time.perf_counter(), float("nan")

    def save_resume_point():
        with atomic.atomic_path(resume_path) as tmp:
            torch.save({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "step": step,
                        "fingerprint": fingerprint}, tmp)

    progress = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=False)
    try:
        with stop_signals() as stop, progress:
            task = progress.add_task(stage, total=total, completed=step, loss=float("nan"))
            method.train()
            while step < total:
                epoch, offset = divmod(step, steps_per_epoch)
                views.epoch = epoch
                loader = torch.utils.data.DataLoader(
                    views, batch_size=cfg.batch_size, drop_last=True, num_workers=workers,
                    sampler=EpochSampler(len(views), seed, epoch, offset * cfg.batch_size),
                    pin_memory=device.type == "cuda",
                    generator=torch.Generator().manual_seed(seed + epoch))  # keeps the global RNG untouched
                for batch in loader:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step, total, warmup, cfg.lr)
                    with autocast:
                        out = method.training_step(_to(batch, device))
                    loss = out["loss"]
                    if not torch.isfinite(loss):
                        raise TrainingError(f"{stage}: loss became {loss.item()} at step {step + 1}; "
                                            f"the last resume point in {out_dir} is kept")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if hasattr(method, "after_step"):
                        method.after_step(step, total)
                    step += 1
                    loss_value = loss.item()
                    progress.update(task, completed=step, loss=loss_value)
                    if log:
                        record = {"stage": stage, "step": step, "epoch": epoch,
                                  "lr": optimizer.param_groups[0]["lr"], "time": time.time()}
                        record.update({k: float(v.detach()) for k, v in out.items()})
                        log.write(json.dumps(record) + "\n")
                    if step % cfg.checkpoint_every == 0 or step == total:
                        save_resume_point()
                    if stop["signal"]:
                        save_resume_point()
                        raise Interrupted(f"{stage}: stopped by {stop['signal']} at step {step}/{total}; "
                                          f"run the same command with --resume to continue")
                    if step >= total:
                        break
    finally:
        if log:
            log.close()
    return TrainResult(steps=step, final_loss=loss_value, seconds=time.perf_counter() - started)
