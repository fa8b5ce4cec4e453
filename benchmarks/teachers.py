"""The teacher zoo on CIFAR-10: every teacher method trained with the same budget, scored by k-NN.

Each method trains a fresh backbone through the real trainer for the same number of images seen (train
images x epochs, same batch size, optimiser and cosine schedule), then a weighted k-NN (k=200, T=0.1,
cosine) with a bank of labelled train images scores a subset of the test split. A random-initialised
backbone, scored the same way, is the floor every teacher should beat. Heads are scaled to the budget
(see OPTIONS); everything else is each method's paper default.

    python benchmarks/teachers.py                    # the reduced budget (CPU preset), or the GPU one on a GPU
    python benchmarks/teachers.py --preset gpu       # 50,000 images, ResNet-18, 20 epochs
    python benchmarks/teachers.py --methods rotation,jigsaw --epochs 2

Writes benchmarks/results/teachers-<cpu|gpu>.json. Data: $KT_EDGE_SHARED_DATA/cifar10/{train,test}
(default ../shared/data next to the repository), an ImageFolder tree of the CIFAR-10 images.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kt_edge_runtime.bench import machine_name  # noqa: E402

from kt_edge.atomic import write_json  # noqa: E402
from kt_edge.data.augment import eval_transform  # noqa: E402
from kt_edge.data.sources import open_images  # noqa: E402
from kt_edge.engine.trainer import train  # noqa: E402
from kt_edge.evaluate.knn import KnnSetting, knn_accuracy  # noqa: E402
from kt_edge.features import embed  # noqa: E402
from kt_edge.models.backbones import build_backbone  # noqa: E402
from kt_edge.recipe import TrainConfig  # noqa: E402
from kt_edge.teachers import TEACHERS  # noqa: E402

IMAGE_SIZE = 32
KNN = KnnSetting(200, 0.1)
PRESETS = {
    # Sized so the eight methods train and are scored in about a quarter of an hour on two shared CPU cores.
    "cpu": {
        "arch": "alexnet",
        "train_images": 576,
        "epochs": 1,
        "batch_size": 32,
        "bank": 1000,
        "test": 500,
        "workers": 0,
    },
    "gpu": {
        "arch": "resnet18",
        "train_images": 50_000,
        "epochs": 20,
        "batch_size": 512,
        "bank": 50_000,
        "test": 10_000,
        "workers": 8,
    },
}
OPTIONS = {
    "cpu": {
        "moco": {"queue": 500, "hidden": 512, "dim": 128, "momentum": 0.99},
        "simclr": {"hidden": 512, "dim": 128},
        "byol": {"hidden": 512, "dim": 128},
        "barlow": {"hidden": 512, "dim": 512},
        "jigsaw": {"tile_dim": 128, "hidden": 512},
        "jigsaw_pp": {"tile_dim": 128, "hidden": 512},
        "rpl": {"tile_dim": 128, "hidden": 512},
        "rotation": {},
    },
    "gpu": {
        "moco": {"queue": 16384, "momentum": 0.99},  # the CIFAR settings of the MoCo v2 reproductions
        "simclr": {},
        "byol": {},
        "barlow": {"hidden": 2048, "dim": 2048},  # the paper's CIFAR-10 projector
        "jigsaw": {},
        "jigsaw_pp": {},
        "rpl": {},
        "rotation": {},
    },
}


def shared_data() -> Path:
    return Path(os.environ.get("KT_EDGE_SHARED_DATA") or REPO.parent / "shared" / "data")


def machine(device: torch.device) -> dict:
    return {
        "cpu": machine_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def knn_top1(backbone, bank_set, test_set, device, workers) -> float:
    bank, bank_labels = embed(backbone, bank_set, device=device, workers=workers, progress=False)
    feats, labels = embed(backbone, test_set, device=device, workers=workers, progress=False)
    return knn_accuracy(bank, bank_labels, feats, labels, (KNN,))[0]["top1"]


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    arch = args.arch or preset["arch"]
    n_train = args.train_images or preset["train_images"]
    epochs = args.epochs or preset["epochs"]
    batch_size = args.batch_size or preset["batch_size"]
    workers = preset["workers"] if args.workers is None else args.workers
    root = args.data / "cifar10"
    train_set = open_images(root / "train", subset=n_train, seed=args.seed)
    bank_set = open_images(root / "train", subset=args.bank or preset["bank"], seed=args.seed + 1)
    test_set = open_images(root / "test", subset=args.test or preset["test"], seed=args.seed)
    bank_set, test_set = (s.with_transform(eval_transform(IMAGE_SIZE)) for s in (bank_set, test_set))
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        optimizer="adamw",
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=0,
        checkpoint_every=10**9,
    )
    steps = epochs * (len(train_set) // batch_size)
    load_start = os.getloadavg()[0]
    print(
        f"{len(train_set)} train images x {epochs} epochs = {steps} steps of {batch_size} on {device} ({arch}); "
        f"k-NN bank {len(bank_set)}, test {len(test_set)}",
        flush=True,
    )

    results = {}
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    results["random_init"] = {
        "knn_top1": knn_top1(build_backbone(arch, IMAGE_SIZE), bank_set, test_set, device, workers),
        "eval_seconds": time.perf_counter() - started,
    }
    print(f"{'random_init':12s} k-NN {results['random_init']['knn_top1']:6.2f}%", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.methods:
            options = dict(OPTIONS[args.preset][name])
            if "queue" in options:  # a queue must stay smaller than the training set
                options["queue"] = min(options["queue"], len(train_set) // 2)
            torch.manual_seed(args.seed)
            method = TEACHERS[name](build_backbone(arch, IMAGE_SIZE), options, n_images=len(train_set))
            t0 = time.perf_counter()
            result = train(
                method,
                train_set,
                cfg,
                Path(scratch) / name,
                stage=name,
                seed=args.seed,
                device=device,
                image_size=IMAGE_SIZE,
                workers=workers,
            )
            t1 = time.perf_counter()
            top1 = knn_top1(method.backbone, bank_set, test_set, device, workers)
            t2 = time.perf_counter()
            results[name] = {
                "knn_top1": top1,
                "final_loss": result.final_loss,
                "steps": result.steps,
                "images_seen": result.steps * batch_size,
                "train_seconds": t1 - t0,
                "eval_seconds": t2 - t1,
                "options": TEACHERS[name].Options(**options).model_dump(),
            }
            print(
                f"{name:12s} k-NN {top1:6.2f}%  loss {result.final_loss:8.4f}  train {t1 - t0:6.1f} s  "
                f"eval {t2 - t1:5.1f} s",
                flush=True,
            )
    return {
        "benchmark": "teachers",
        "machine": {**machine(device), "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]}},
        "data": {
            "dataset": "CIFAR-10",
            "train": {"split": "train", "images": len(train_set), "subset_seed": args.seed},
            "knn_bank": {"split": "train", "images": len(bank_set), "subset_seed": args.seed + 1},
            "scored": {"split": "test", "images": len(test_set), "subset_seed": args.seed},
            "image_size": IMAGE_SIZE,
        },
        "budget": {
            "preset": args.preset,
            "arch": arch,
            "epochs": epochs,
            "batch_size": batch_size,
            "steps": steps,
            "images_seen": steps * batch_size,
            "optimizer": "adamw",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": "cosine, no warm-up",
            "seed": args.seed,
        },
        "knn": {"k": KNN.k, "t": KNN.t, "metric": "cosine, weighted vote exp(sim / t)"},
        "results": results,
        "wall_seconds": time.perf_counter() - started,
        "notes": [
            (
                "images_seen counts source images: a two-view method sees two augmentations of each, rotation four "
                "rotations, jigsaw nine tiles, rpl two patches, so compute per image differs by method"
            ),
            "patch methods (jigsaw, jigsaw_pp, rpl) train their encoder on tiles and are scored on whole images",
        ],
    }


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=",".join(TEACHERS), help="comma list of teacher methods (default all)")
    p.add_argument("--arch", choices=("alexnet", "resnet18", "resnet50"), default=None)
    p.add_argument("--train-images", type=int, default=None, help="seeded subset of CIFAR-10 train to train on")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--bank", type=int, default=None, help="labelled train images in the k-NN bank")
    p.add_argument("--test", type=int, default=None, help="test images scored")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", type=Path, default=shared_data(), help="folder holding cifar10/{train,test}")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/teachers-<device>.json)"
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in TEACHERS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(TEACHERS)}")
    if not (args.data / "cifar10" / "train").is_dir():
        p.error(f"no CIFAR-10 ImageFolder under {args.data / 'cifar10'}; set KT_EDGE_SHARED_DATA or --data")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    report = run(args)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / f"teachers-{device}.json"
    write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
