"""Tiny training runs for tests/scale/test_data_parallel.py: under torchrun, as threads, or as one process.

``python -m torch.distributed.run --nproc_per_node 2 ddp_train.py OUT`` runs every scenario as one rank of a
real gloo group; ``emulate(OUT)`` runs the same ranks as threads of one process over torch's in-process
(threaded) group; ``run(name, OUT)`` alone is the one-process run on the global batch. Each rank saves its
final state as rank<r>.pt beside rank 0's metrics.

The networks are tiny: BN-free for SEED (so one process on the global batch computes the same thing), with
BatchNorm for the joint-embedding teachers (each rank normalises its own images, as on GPUs without
SyncBatchNorm, which torch runs on CUDA only).
"""

from __future__ import annotations

import sys
import threading
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
from kt_edge.teachers.barlow import BarlowTwins  # noqa: E402
from kt_edge.teachers.byol import BYOL  # noqa: E402
from kt_edge.teachers.moco import MoCo  # noqa: E402
from kt_edge.teachers.simclr import SimCLR  # noqa: E402
from kt_edge.transfer.seed import Seed  # noqa: E402

SAMPLE = REPO / "data" / "sample" / "cifar10"
CPU = torch.device("cpu")
SCENARIOS = {
    "seed_per_sample": ("seed", "per_sample"),
    "seed_batched": ("seed", "batched"),
    "moco_batched": ("moco", "batched"),
    "simclr_batched": ("simclr", "batched"),
    "byol_batched": ("byol", "batched"),
    "barlow_batched": ("barlow", "batched"),
}
WORLD = 2


def tiny_backbone(seed: int, batchnorm: bool = False) -> Backbone:
    torch.manual_seed(seed)
    norm = [nn.BatchNorm2d(8)] if batchnorm else []
    body = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        *norm,
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Backbone("tiny", 32, body, 16)


def images(augment: str):
    files = open_images(SAMPLE / "train", subset=64, seed=0)
    if augment == "per_sample":
        return files
    pixels = np.stack([np.asarray(files.image(i)) for i in range(len(files))])
    return ArrayImages(pixels, files.labels, files.classes, "sample in memory")


def method_for(kind: str, n: int):
    small = {"hidden": 32, "dim": 16}
    if kind == "seed":
        return Seed(tiny_backbone(1), FrozenTeacher(tiny_backbone(2), CPU), {"queue": 32, "hidden": 32}, n)
    torch.manual_seed(3)
    if kind == "moco":
        return MoCo(tiny_backbone(1, batchnorm=True), {"queue": 32, **small, "momentum": 0.9}, n)
    cls = {"simclr": SimCLR, "byol": BYOL, "barlow": BarlowTwins}[kind]
    return cls(tiny_backbone(1, batchnorm=True), small, n)


def run(name: str, out: Path, method=None) -> None:
    """One scenario (six steps of a global batch of 16); every rank saves its final state."""
    kind, augment = SCENARIOS[name]
    data = images(augment)
    method = method or method_for(kind, len(data))
    cfg = TrainConfig(epochs=10, max_steps=6, batch_size=16, optimizer="sgd", lr=0.1, checkpoint_every=4, log_every=1)
    folder = out / name
    train(
        method,
        data,
        cfg,
        folder,
        stage=name,
        seed=0,
        device=CPU,
        image_size=32,
        metrics_path=folder / "metrics.jsonl",
        augment=augment,
    )
    distributed.barrier()
    torch.save(method.state_dict(), folder / f"rank{distributed.rank()}.pt")


def in_threads(work, world: int = WORLD) -> list:
    """``work(rank)`` on ``world`` threads of this process joined in torch's threaded process group; the results
    in rank order. Whatever ``work`` draws from torch's global generator, the threads share."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.multi_threaded_pg import _install_threaded_pg, _uninstall_threaded_pg

    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    _install_threaded_pg()
    store, results, failures = dist.HashStore(), [None] * world, []

    def rank_thread(rank: int):
        dist.init_process_group("threaded", rank=rank, world_size=world, store=store)
        try:
            results[rank] = work(rank)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller below
            failures.append(exc)
        finally:
            dist.destroy_process_group()

    threads = [threading.Thread(target=rank_thread, args=(r,)) for r in range(world)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
    finally:
        _uninstall_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
    if failures:
        raise failures[0]
    return results


def emulate(out: Path) -> None:
    """Every scenario as WORLD ranks that are threads of this process. The methods are built here, in order,
    before the threads start: building draws from torch's global generator, which the threads share."""
    methods = {(name, r): method_for(SCENARIOS[name][0], 64) for name in SCENARIOS for r in range(WORLD)}

    def work(rank: int):
        for name in SCENARIOS:
            run(name, out, methods[name, rank])

    in_threads(work)


if __name__ == "__main__":  # one rank under torchrun
    torch.set_num_threads(1)
    assert distributed.init_from_env("cpu"), "run me under torchrun --nproc_per_node 2"
    for scenario in SCENARIOS:
        run(scenario, Path(sys.argv[1]))
    import torch.distributed as dist

    dist.destroy_process_group()
