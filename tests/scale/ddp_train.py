"""Tiny training runs for tests/scale/test_data_parallel.py, as one process or as rank r of two.

``rank_main`` sets the environment variables torchrun would (MASTER_ADDR/PORT, RANK, LOCAL_RANK,
WORLD_SIZE), so the pipeline's own ``init_from_env`` joins the gloo group.

The equivalence runs use BN-free networks: SyncBatchNorm needs GPUs, and per-rank BatchNorm
statistics legitimately differ from one process's, which would hide what is being checked (the
data split, the gradient all-reduce and the gathered queue).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from kt_edge.data.sources import ArrayImages, open_images  # noqa: E402
from kt_edge.engine import distributed  # noqa: E402
from kt_edge.engine.trainer import train  # noqa: E402
from kt_edge.models.backbones import Backbone  # noqa: E402
from kt_edge.models.frozen import FrozenTeacher  # noqa: E402
from kt_edge.recipe import TrainConfig  # noqa: E402
from kt_edge.teachers.moco import MoCo  # noqa: E402
from kt_edge.transfer.seed import Seed  # noqa: E402

SAMPLE = REPO / "data" / "sample" / "cifar10"
CPU = torch.device("cpu")
SCENARIOS = {"seed_per_sample": ("seed", "per_sample"), "seed_batched": ("seed", "batched"),
             "moco_batched": ("moco", "batched")}


def tiny_backbone(seed: int, batchnorm: bool = False) -> Backbone:
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(8)] if batchnorm else []
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), *norm, nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone("tiny", 32, body, 16)


def images(augment: str):
    files = open_images(SAMPLE / "train", subset=64, seed=0)
    if augment == "per_sample":
        return files
    pixels = np.stack([np.asarray(files.image(i)) for i in range(len(files))])
    return ArrayImages(pixels, files.labels, files.classes, "sample in memory")


def method_for(kind: str, n: int):
    if kind == "seed":
        return Seed(tiny_backbone(1), FrozenTeacher(tiny_backbone(2), CPU), {"queue": 32, "hidden": 32}, n)
    return MoCo(tiny_backbone(1, batchnorm=True), {"queue": 32, "hidden": 32, "dim": 16, "momentum": 0.9}, n)


def run(name: str, out: Path) -> None:
    """One scenario; every rank saves its final state as rank<r>.pt beside rank 0's metrics."""
    kind, augment = SCENARIOS[name]
    data = images(augment)
    method = method_for(kind, len(data))
    cfg = TrainConfig(epochs=10, max_steps=6, batch_size=16, optimizer="sgd", lr=0.1, checkpoint_every=4)
    folder = out / name
    train(method, data, cfg, folder, stage=name, seed=0, device=CPU, image_size=32,
          metrics_path=folder / "metrics.jsonl", augment=augment)
    distributed.barrier()
    torch.save(method.state_dict(), folder / f"rank{distributed.rank()}.pt")


def shuffle_check(out: Path) -> None:
    """Each rank's shuffled slice, and what unshuffling its outputs gives back, as JSON per rank."""
    mine = torch.arange(8) + 8 * distributed.rank()  # global indices of this rank's images
    shuffled, inverse = distributed.shuffle_batch(mine.float()[:, None])
    back = distributed.unshuffle_batch(shuffled, inverse)
    (out / f"shuffle{distributed.rank()}.json").write_text(json.dumps(
        {"shuffled": shuffled[:, 0].tolist(), "back": back[:, 0].tolist(), "mine": mine.tolist()}))


def rank_main(rank: int, port: int, out: Path) -> None:
    """Every scenario as rank ``rank`` of 2, joined through torchrun's environment variables."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert distributed.init_from_env("cpu"), "expected a process group of 2"
        for name in SCENARIOS:
            run(name, out)
        shuffle_check(out)
        distributed.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(threads)
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(key, None)
