"""Training throughput: images/s, achieved TFLOP/s and the fraction of the GPU's dense bf16 peak.

Side by side in one run, each through the project's own code paths:

  data     the data path alone, images/s it can feed the model (SEED's one-view MoCo v2 augmentation):
           batched (uint8 cache rows -> device -> BatchAugment), per-sample from the JPEG files
           (DataLoader workers decode and run torchvision MoCo v2), per-sample from the cache
  seed     SEED distillation, ResNet-50 teacher (frozen; bf16 on GPU) -> ResNet-18 student, at 224 px
           (Imagenette) and 32 px (CIFAR-10), trained by kt_edge.engine.trainer.train on both data paths
  teachers teacher training, batched data path: MoCo v2 ResNet-50 at 224 px; MoCo v2 ResNet-18 and ResNet-50
           (the teacher recipes/cifar10.yaml trains) and SimCLR ResNet-18 at 32 px
  extract  ResNet-50 feature extraction: features.extract end to end from the cache, and the model
           alone on device tensors

Training images/s are the images of the timed steps over their wall time (from the end of the warm-up
to the end of the last step, data loading and every stall included; a median step interval would
over-report a run the data path holds back); FLOPs per image come from torch.utils.flop_counter on one
step (forward and backward, the frozen teacher included) and give the achieved TFLOP/s and the fraction
of the GPU's dense bf16 peak. Networks are randomly
initialised: speed does not depend on the weights. Results: benchmarks/results/throughput-<machine>.json.

    python benchmarks/throughput.py                          # sized for the device found
    python benchmarks/throughput.py --only seed,data --steps 60 --batch-224 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kt_edge_runtime.bench import machine_name  # noqa: E402

from kt_edge.atomic import write_json  # noqa: E402
from kt_edge.data.augment import MEAN, STD, moco_v2  # noqa: E402
from kt_edge.data.cache import cached_source  # noqa: E402
from kt_edge.data.feed import TrainingFeed  # noqa: E402
from kt_edge.data.sources import open_source  # noqa: E402
from kt_edge.engine.device import resolve_device  # noqa: E402
from kt_edge.engine.trainer import train  # noqa: E402
from kt_edge.features import extract  # noqa: E402
from kt_edge.models.backbones import build_backbone  # noqa: E402
from kt_edge.models.frozen import FrozenTeacher  # noqa: E402
from kt_edge.models.heads import projection_head  # noqa: E402
from kt_edge.recipe import DataSource, TrainConfig  # noqa: E402
from kt_edge.teachers.moco import MoCo  # noqa: E402
from kt_edge.teachers.simclr import SimCLR  # noqa: E402
from kt_edge.transfer.seed import Seed  # noqa: E402

SECTIONS = ("data", "seed", "teachers", "extract")
TEACHER_CELLS = {224: (("moco", "resnet50"),), 32: (("moco", "resnet18"), ("moco", "resnet50"), ("simclr", "resnet18"))}
# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets; the first name fragment found wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
TARGET_SEED_224 = 10_000  # images/s, SEED R50 -> R18 at 224 px on one H200 (about 20% of its bf16 peak)
DEFAULTS = {  # per device type: global batch at 224 / 32 px, images per data set (None: all), steps, warm-up
    # steps, DataLoader workers, images to extract features of (None: all)
    "cuda": {
        "batch_224": 256,
        "batch_32": 512,
        "subset_224": None,
        "subset_32": None,
        "steps": 40,
        "warmup": 10,
        "workers": min(12, os.cpu_count() or 1),
        "extract_images": None,
    },
    "cpu": {
        "batch_224": 2,
        "batch_32": 16,
        "subset_224": 64,
        "subset_32": 256,
        "steps": 4,
        "warmup": 1,
        "workers": min(2, os.cpu_count() or 1),
        "extract_images": 16,
    },
}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def peak_tflops(gpu: str | None) -> float | None:
    if gpu is None:
        return None
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS if fragment in gpu), None)


def machine(device: torch.device) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": gpu or f"CPU: {machine_name()}",
        "gpu": gpu,
        "cpu": machine_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peak_bf16_tflops": peak_tflops(gpu),
        "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- models and FLOPs


def seed_method(size: int, n_images: int, batch: int, device: torch.device) -> Seed:
    """SEED R50 -> R18, distilling the teacher's 128-d MoCo v2 projection as the official code does."""
    teacher = FrozenTeacher(build_backbone("resnet50", size), device, projection_head(2048, 2048, 128))
    return Seed(build_backbone("resnet18", size), teacher, {"queue": queue_size(n_images, batch)}, n_images)


def teacher_method(name: str, arch: str, size: int, n_images: int, batch: int):
    if name == "moco":
        return MoCo(build_backbone(arch, size), {"queue": queue_size(n_images, batch)}, n_images)
    return SimCLR(build_backbone(arch, size), {}, n_images)


def queue_size(n_images: int, batch: int) -> int:
    """The official 65536, or the largest power of two up to a quarter of the data set (kt-edge warns above
    it), as a whole number of batches."""
    size = min(65536, 2 ** int(np.log2(max(2, n_images // 4))))
    return max(batch, size // batch * batch)


def step_flops(method, size: int, views: int, n: int = 2) -> float:
    """FLOPs of one training step (forward + backward, teacher included) per image, on the CPU in fp32."""
    method.train()
    images = torch.randn(n, 3, size, size)
    batch = ((images, images.clone()) if views == 2 else images), torch.zeros(n, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        method.training_step(batch)["loss"].backward()
    return counter.get_total_flops() / n


def forward_flops(model, size: int, n: int = 2) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.randn(n, 3, size, size))
    return counter.get_total_flops() / n


def fraction(row: dict) -> str:
    share = row.get("fraction_of_bf16_peak")
    return f", {100 * share:.1f}% of bf16 peak" if share is not None else ""


def with_compute(result: dict, flops_per_image: float, peak: float | None) -> dict:
    achieved = flops_per_image * result["images_per_s"] / 1e12
    result.update(
        gflops_per_image=flops_per_image / 1e9,
        achieved_tflops=achieved,
        fraction_of_bf16_peak=achieved / peak if peak else None,
    )
    return result


# --------------------------------------------------------------------------- measurements


def data_rate(kind: str, images, size: int, batch: int, steps: int, warmup: int, device, workers: int) -> dict:
    """images/s the training feed delivers to the device, augmented and ready for the model (SEED's one view)."""
    feed = TrainingFeed(
        images,
        moco_v2(size),
        "batched" if kind == "batched" else "per_sample",
        seed=0,
        batch_size=batch,
        image_size=size,
        device=device,
        workers=workers,
    )

    def batches():
        for epoch in itertools.count():
            yield from feed.epoch(epoch, 0)

    started = None
    for i, (views, _) in zip(range(steps), batches()):  # noqa: B007 (the last batch is synced below)
        if i == warmup - 1:
            sync(device)
            started = time.perf_counter()
    views.sum().item()
    seconds = time.perf_counter() - started
    return {"images_per_s": (steps - warmup) * batch / seconds, "batches_timed": steps - warmup, "batch": batch}


def train_rate(
    name: str,
    method,
    data,
    size: int,
    batch: int,
    steps: int,
    warmup: int,
    augment: str,
    device,
    workers: int,
    folder: Path,
    compile_: bool,
) -> dict:
    """images/s of the real training loop: the timed steps' images over their wall time.

    The loop logs (and so synchronises with the device) every ``warmup`` steps; the times logged at the end of
    the warm-up and at the last step bound the timed steps.
    """
    cfg = TrainConfig(
        epochs=10**6,
        max_steps=steps,
        batch_size=batch,
        lr=0.01,
        checkpoint_every=10**9,
        log_every=warmup,
        compile=compile_,
    )
    run = folder / f"{name}-{augment}"
    train(
        method,
        data,
        cfg,
        run,
        stage=name,
        seed=0,
        device=device,
        image_size=size,
        workers=workers,
        metrics_path=run / "metrics.jsonl",
        augment=augment,
    )
    logged = {r["step"]: r["time"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    seconds = logged[steps] - logged[warmup]
    return {
        "images_per_s": (steps - warmup) * batch / seconds,
        "seconds": seconds,
        "steps_timed": steps - warmup,
        "batch": batch,
    }


def extract_rate(images, size: int, batch: int, device, workers: int, folder: Path, limit: int | None) -> dict:
    """End to end: cached uint8 rows -> tensors in workers -> ResNet-50 (bf16 on GPU) -> fp16 shards."""
    model = build_backbone("resnet50", size)
    dataset = images.with_transform(T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)]))
    dataset = torch.utils.data.Subset(dataset, range(min(limit or len(dataset), len(dataset))))
    started = time.perf_counter()
    store = extract(
        model, dataset, folder / "features", batch_size=batch, device=device, workers=workers, progress=False
    )
    seconds = time.perf_counter() - started
    return {"images_per_s": store.n / seconds, "images": store.n, "batch": batch}


def model_rate(size: int, batch: int, device, repeats: int) -> dict:
    """The ResNet-50 forward alone on device tensors (channels-last, bf16 autocast on GPU)."""
    model = build_backbone("resnet50", size).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        model(x)
        sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            model(x)
        sync(device)
    return {"images_per_s": repeats * batch / (time.perf_counter() - started), "batch": batch}


# --------------------------------------------------------------------------- the run


def dataset_folder(args, size: int) -> Path:
    """Imagenette train at 224 px and CIFAR-10 train at 32 (or the folders --data-224 and --data-32 name)."""
    given = args.data_224 if size > 64 else args.data_32
    return given or args.data / ("imagenette/train" if size > 64 else "cifar10/train")


def datasets(args, size: int, subset: int | None, cache_dir: Path):
    """(JPEG files, their uint8 cache at ``size``) for one resolution."""
    folder = dataset_folder(args, size)
    if not folder.is_dir():
        raise SystemExit(f"data folder not found: {folder} (set --data or KT_EDGE_SHARED_DATA)")
    source = DataSource(path=folder, subset=subset)
    return open_source(source, seed=0), cached_source(source, size, 0, cache_dir, workers=args.workers, progress=False)


def run(args) -> dict:
    device = resolve_device(args.device)
    peak = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    report = {
        "benchmark": "throughput",
        "machine": machine(device),
        "params": {},
        "data": {},
        "train": {},
        "extract": {},
    }
    sizes = {
        size: {224: (args.batch_224, args.subset_224), 32: (args.batch_32, args.subset_32)}[size] for size in args.sizes
    }
    with tempfile.TemporaryDirectory(prefix="kt-edge-throughput-") as tmp:
        tmp = Path(tmp)
        cache_dir = args.cache_dir or tmp / "cache"
        for size, (batch, subset) in sizes.items():
            files, cached = datasets(args, size, subset, cache_dir)
            n, key = len(cached), f"{size}px"
            report["params"][key] = {
                "images": n,
                "batch": batch,
                "queue": queue_size(n, batch),
                "source": str(dataset_folder(args, size)),
            }
            if "data" in args.only:
                report["data"][key] = {
                    kind: data_rate(kind, images, size, batch, args.steps, args.warmup, device, args.workers)
                    for kind, images in (("batched", cached), ("per_sample_files", files), ("per_sample_cache", cached))
                }
                print(
                    f"data {key}: "
                    + ", ".join(f"{k} {v['images_per_s']:.0f} img/s" for k, v in report["data"][key].items()),
                    flush=True,
                )

            rate = partial(  # one training-rate cell of this resolution
                train_rate, size=size, batch=batch, steps=args.steps, warmup=args.warmup, device=device,
                workers=args.workers, folder=tmp, compile_=args.compile,
            )  # fmt: skip
            if "seed" in args.only:
                flops = step_flops(seed_method(size, n, batch, torch.device("cpu")), size, views=1)
                rows = {}
                for augment, data in (("batched", cached), ("per_sample", files)):
                    torch.manual_seed(0)
                    method = seed_method(size, n, batch, device)
                    rows[augment] = with_compute(rate(f"seed-{size}", method, data, augment=augment), flops, peak)
                report["train"][f"seed_r50_to_r18_{key}"] = rows
                print(
                    f"seed r50->r18 {key}: "
                    + ", ".join(
                        f"{k} {v['images_per_s']:.1f} img/s ({v['achieved_tflops']:.3f} TFLOP/s{fraction(v)})"
                        for k, v in rows.items()
                    ),
                    flush=True,
                )
            if "teachers" in args.only:
                for name, arch in TEACHER_CELLS[size]:
                    flops = step_flops(teacher_method(name, arch, size, n, batch), size, views=2)
                    torch.manual_seed(0)
                    method = teacher_method(name, arch, size, n, batch)
                    row = with_compute(rate(f"{name}-{arch}-{size}", method, cached, augment="batched"), flops, peak)
                    report["train"][f"{name}_{arch.replace('resnet', 'r')}_{key}"] = {"batched": row}
                    print(
                        f"{name} {arch} {key}: {row['images_per_s']:.1f} img/s "
                        f"({row['achieved_tflops']:.3f} TFLOP/s{fraction(row)})",
                        flush=True,
                    )
            if "extract" in args.only:
                flops = forward_flops(build_backbone("resnet50", size), size)
                report["extract"][f"r50_{key}"] = {
                    "end_to_end": with_compute(
                        extract_rate(cached, size, batch, device, args.workers, tmp / key, args.extract_images),
                        flops,
                        peak,
                    ),
                    "model_only": with_compute(
                        model_rate(size, batch, device, max(3, args.steps - args.warmup)), flops, peak
                    ),
                }
                print(
                    f"extract r50 {key}: "
                    + ", ".join(
                        f"{k} {v['images_per_s']:.1f} img/s" for k, v in report["extract"][f"r50_{key}"].items()
                    ),
                    flush=True,
                )
    seed_224 = report["train"].get("seed_r50_to_r18_224px", {}).get("batched")
    gpu = report["machine"]["gpu"] or ""
    report["target"] = {
        "seed_r50_to_r18_224px_images_per_s": TARGET_SEED_224,
        "on": "one H100 or H200",
        "measured": seed_224["images_per_s"] if seed_224 else None,
        "met": (seed_224["images_per_s"] >= TARGET_SEED_224) if seed_224 and ("H100" in gpu or "H200" in gpu) else None,
    }
    report["params"].update(
        steps=args.steps,
        warmup=args.warmup,
        workers=args.workers,
        compile=args.compile,
        extract_images=args.extract_images,
        device=str(device),
        amp_bf16=device.type == "cuda",
        channels_last=device.type == "cuda",
    )
    report["machine"]["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    report["notes"] = [
        (
            "training images/s: the timed steps' images over their wall time (end of warm-up to end of the last "
            "step), data loading included; the DataLoader's start is inside the warm-up"
        ),
        (
            "FLOPs: torch.utils.flop_counter on one step at batch 2 (fp32, CPU), per image; achieved TFLOP/s = "
            "FLOPs per image x images/s; the fraction of peak uses the dense bf16 peak of the GPU (none on CPU)"
        ),
        (
            "on CPU the batched path augments on the CPU in the main process: its figures show the code path "
            "works, not what it gains on a GPU; on a loaded CPU, more torch threads than free cores makes every "
            "OpenMP region wait (see machine.torch_threads and the load averages)"
        ),
    ]
    return report


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = os.environ.get("KT_EDGE_SHARED_DATA", str(REPO.parent / "shared" / "data"))
    p.add_argument("--data", type=Path, default=Path(shared), help="folder with imagenette/ and cifar10/ trees")
    p.add_argument(
        "--data-224", type=Path, default=None, help="image folder for 224 px (default --data/imagenette/train)"
    )
    p.add_argument("--data-32", type=Path, default=None, help="image folder for 32 px (default --data/cifar10/train)")
    p.add_argument("--sizes", default="224,32", help="image sizes to measure, of 224 and 32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    for key in ("batch_224", "batch_32", "subset_224", "subset_32", "steps", "warmup", "workers", "extract_images"):
        p.add_argument("--" + key.replace("_", "-"), type=int, default=None, help="default: sized for the device")
    p.add_argument("--compile", action="store_true", help="train with torch.compile (train.compile: true)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default torch's); 1 avoids OpenMP contention on a busy shared CPU",
    )
    p.add_argument("--cache-dir", type=Path, default=None, help="keep image caches here (default: a temp folder)")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/throughput-<machine>.json)"
    )
    args = p.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    args.sizes = [int(v) for v in args.sizes.split(",") if v]
    if not set(args.sizes) <= {224, 32}:
        p.error(f"--sizes {args.sizes}: choose from 224 and 32")
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    defaults = DEFAULTS[resolve_device(args.device).type]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps <= args.warmup or args.steps % args.warmup:
        p.error(
            f"--steps ({args.steps}) must be a multiple of --warmup ({args.warmup}) above it (the loop "
            "synchronises every --warmup steps)"
        )
    return args


def main(argv=None) -> Path:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run(args)
    name = slug(report["machine"]["gpu"] or "cpu-" + report["machine"]["cpu"])
    out = args.out or REPO / "benchmarks" / "results" / f"throughput-{name}.json"
    write_json(out, report)
    print(f"device: {report['machine']['device']}\nwrote {out}")
    return out


if __name__ == "__main__":
    main()
