"""Exported student speed and quality on this CPU: PyTorch eager fp32 vs ONNX Runtime fp32 and int8.

For every student (ResNet-18, AlexNet, MobileNetV3-Large/Small, EfficientNet-B0), in one run and one process:
- size: parameters, forward GFLOPs per image (torch's FlopCounterMode: 2 per multiply-add), ONNX file sizes;
- latency at batch 1 and 32 (median, p90, min) and the ratios the targets name, timed in rounds of blocks;
- quality over the whole Imagenette val split: the per-image cosine of each backend's embeddings against
  PyTorch's (min, 1st percentile, median) and weighted k-NN top-1 (k=200, T=0.1) with a train-split bank.

int8 is quantized for both targets: "onnxruntime" (uint8 activations, 7-bit weights: ONNX Runtime's fused
CPU kernels, exact on every CPU) and "tensorrt" (symmetric int8 for TensorRT, which ONNX Runtime runs
exactly only in its u8u8 mode on x86). The JSON records which kernels ran (ONNX Runtime's profiler).

Weights: a student checkpoint folder per architecture (--student ARCH=FOLDER, preprocessed as its card says),
else random initialisation at --size (BatchNorm statistics fitted on 64 Imagenette train images) -- the JSON
says which. Random-init MobileNets and EfficientNets are chaotic (5% input noise moves their embeddings far
more than a random ResNet-18's), so their int8 cosines say little about trained ones: pass trained students.

    python benchmarks/export.py                       # writes benchmarks/results/export-cpu.json
    python benchmarks/export.py --student mobilenet_v3_large=runs/quickstart/student --archs mobilenet_v3_large
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from kt_edge_runtime.backends.onnxruntime import OrtBackend
from kt_edge_runtime.bench import machine_name
from kt_edge_runtime.bundle import InputSpec
from kt_edge_runtime.parity import golden_parity, knn_top1
from kt_edge_runtime.preprocess import preprocess_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from throughput import forward_flops  # noqa: E402  (beside this script)

from kt_edge.atomic import write_json  # noqa: E402
from kt_edge.export.int8_choice import choose_int8  # noqa: E402
from kt_edge.export.onnx import export_fp32  # noqa: E402
from kt_edge.models.backbones import STUDENTS, build_backbone  # noqa: E402
from kt_edge.models.checkpoint import load_backbone  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KNN_K, KNN_T = 200, 0.1
CHOICE_IMAGES, MIN_COSINE = 256, 0.98  # the export's defaults: export.int8.choice_images, min_cosine_int8


class TorchRunner:
    """PyTorch eager fp32 with the same .run(batch) interface as the ONNX Runtime backends."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()


def imagenette(data: Path, split: str, count: int | None, seed: int) -> tuple[list[Path], np.ndarray]:
    """Files and labels of an Imagenette split: all of them when count is None, else a seeded sample."""
    root = data / "imagenette" / split
    if not root.is_dir():
        raise SystemExit(f"Imagenette not found under {root}: pass --data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).glob("*.jpg"))]
    pick = np.arange(len(files)) if count is None else np.random.default_rng(seed).choice(len(files), count, False)
    return [files[i][0] for i in pick], np.array([files[i][1] for i in pick])


def input_spec(size: int, card: dict | None = None) -> InputSpec:
    """A checkpoint's own preprocessing, else the ImageNet one (resize by 8/7, centre crop) at ``size``."""
    if card is not None:
        return InputSpec(
            shape=(3, card["crop"], card["crop"]),
            resize=card["resize"],
            crop=card["crop"],
            mean=tuple(card["mean"]),
            std=tuple(card["std"]),
        )
    return InputSpec(shape=(3, size, size), resize=size * 8 // 7, crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def student(arch: str, folder: Path | None, size: int, images) -> tuple[torch.nn.Module, str, InputSpec]:
    """The model, where its weights come from, and its preprocessing; ``images(spec)`` gives the bank and val."""
    if folder is not None:
        model, card = load_backbone(folder)
        if card["arch"] != arch:
            raise SystemExit(f"--student {arch}={folder}: that checkpoint is a {card['arch']}")
        return (
            model.cpu().eval(),
            f"student checkpoint ({card.get('method')}, {card.get('steps')} steps)",
            input_spec(size, card),
        )
    spec = input_spec(size)
    bn_images = images(spec)[0][0][:64]
    torch.manual_seed(0)
    model = build_backbone(arch, size)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        return model.eval(), "random init (seed 0)", spec
    for m in bns:
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(bn_images))
    return (
        model.eval(),
        f"random init (seed 0), BatchNorm statistics from {len(bn_images)} Imagenette train images",
        spec,
    )


def interleaved_latency(runners: dict, shape, batch: int, iters: int, warmup: int, rounds: int = 4) -> dict[str, dict]:
    """Rounds of blocks: each round runs every backend for a block of ``iters / rounds`` timed runs, so load
    from other processes on the machine hits all backends alike. Each block starts with ``warmup`` untimed
    runs: ONNX Runtime's worker threads spin on after a run, and on 2 cores the spinning threads of the
    block before would otherwise be timed as part of the next backend's first runs (timed one run at a time
    in turn, PyTorch at batch 1 measured 16x its own speed)."""
    x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
    times = {name: [] for name in runners}
    per_block = max(1, iters // rounds)
    for _ in range(rounds):
        for name, runner in runners.items():
            for i in range(warmup + per_block):
                start = time.perf_counter()
                runner.run(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
    out = {}
    for name, t in times.items():
        p50, p90 = np.percentile(t, [50, 90]) * 1e3
        out[name] = {
            "p50_ms": float(p50),
            "p90_ms": float(p90),
            "min_ms": float(min(t) * 1e3),
            "throughput_ips": float(batch / np.median(t)),
            "iters": len(t),
        }
    return out


def embed(runner, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([runner.run(images[i : i + batch]) for i in range(0, len(images), batch)])


def ratios(latency: dict) -> dict[str, float]:
    return {
        f"{other}_over_{name}": latency[other]["p50_ms"] / latency[name]["p50_ms"]
        for name in latency
        for other in ("pytorch-fp32", "ort-fp32")
        if other != name
    }


def run_arch(arch: str, folder: Path | None, args, images, workdir: Path) -> dict:
    model, weights, spec = student(arch, folder, args.size, images)
    (bank_x, bank_y), (val_x, val_y) = images(spec)
    fp32 = workdir / f"{arch}.fp32.onnx"
    export_fp32(model, fp32, spec.crop)
    # as `kt-edge export` quantizes (keep_float: auto): calibrated on the bank's first images, the float ops
    # chosen on the next ones, the val split left to measure
    calibration, held_out = bank_x[: args.calibration], bank_x[args.calibration : args.calibration + CHOICE_IMAGES]
    with torch.inference_mode():
        reference = model(torch.from_numpy(held_out)).numpy()
    records = {}
    for target in ("onnxruntime", "tensorrt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records[target] = choose_int8(
                fp32, workdir / f"{arch}.int8-{target}.onnx", calibration, held_out, reference, MIN_COSINE, target
            )
    runners = {
        "pytorch-fp32": TorchRunner(model),
        "ort-fp32": OrtBackend(fp32),
        "ort-int8": OrtBackend(workdir / f"{arch}.int8-onnxruntime.onnx", exact_int8=False),
        "ort-int8-tensorrt-target": OrtBackend(workdir / f"{arch}.int8-tensorrt.onnx", exact_int8=True),
    }
    kernels = {name: r.kernels(val_x[:1]) for name, r in runners.items() if isinstance(r, OrtBackend)}
    latency = {}
    for batch, iters in ((1, args.iters), (32, args.iters_32)):
        latency[f"batch{batch}"] = timed = interleaved_latency(runners, spec.shape, batch, iters, args.warmup)
        for name, r in timed.items():
            print(
                f"{arch:18s} {name:25s} batch {batch:2d}: p50 {r['p50_ms']:8.2f} ms  {r['throughput_ips']:7.1f} img/s"
            )

    embeddings = {}
    for name in ("pytorch-fp32", "ort-int8", "ort-int8-tensorrt-target"):
        started = time.time()
        embeddings[name] = (embed(runners[name], bank_x), embed(runners[name], val_x))
        print(f"{arch:18s} {name:25s} embedded {len(bank_x) + len(val_x)} images in {time.time() - started:.0f} s")
    reference = embeddings["pytorch-fp32"][1]
    quality = {}
    for name, (b, v) in embeddings.items():
        report = golden_parity(reference, v, "int8")
        cosine = {
            "images": report.samples,
            "min": report.min_cosine,
            "p1": report.p1_cosine,
            "median": report.median_cosine,
        }
        quality[name] = {"knn_top1": knn_top1(b, bank_y, v, val_y, k=KNN_K, t=KNN_T), "cosine_vs_pytorch": cosine}
        print(
            f"{arch:18s} {name:25s} k-NN top-1 {quality[name]['knn_top1']:6.2f}  cosine vs PyTorch min "
            f"{report.min_cosine:.4f} p1 {report.p1_cosine:.4f} median {report.median_cosine:.5f}"
        )
    return {
        "weights": weights,
        "preprocess": spec.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gflops_per_image": forward_flops(model, spec.crop) / 1e9,
        "onnx_mib": {p.name.split(".", 1)[1]: p.stat().st_size / 2**20 for p in sorted(workdir.glob(f"{arch}.*.onnx"))},
        "int8_quantization": records,
        "kernels": kernels,
        "latency": latency,
        "p50_ratios": {batch: ratios(timed) for batch, timed in latency.items()},
        "quality": quality,
    }


def student_folders(pairs: list[str]) -> dict[str, Path]:
    folders = {}
    for pair in pairs:
        arch, sep, folder = pair.partition("=")
        if not sep or arch not in STUDENTS:
            raise SystemExit(f"--student {pair!r}: expected ARCH=FOLDER with ARCH one of {', '.join(STUDENTS)}")
        folders[arch] = Path(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--archs", default=",".join(STUDENTS), help=f"comma-separated, of {','.join(STUDENTS)}")
    parser.add_argument("--student", action="append", default=[], metavar="ARCH=FOLDER", help="trained weights")
    parser.add_argument("--size", type=int, default=224, help="image size of the random-init students")
    parser.add_argument("--iters", type=int, default=40, help="timed iterations at batch 1")
    parser.add_argument("--iters-32", type=int, default=10, help="timed iterations at batch 32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--bank", type=int, default=1000, help="k-NN bank size (Imagenette train sample)")
    parser.add_argument("--val", type=int, default=None, help="val images (default: the whole split)")
    parser.add_argument("--calibration", type=int, default=512, help="int8 calibration images (from the bank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export-cpu.json")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a log file as they happen
    archs, folders = args.archs.split(","), student_folders(args.student)
    if unknown := [a for a in archs if a not in STUDENTS]:
        raise SystemExit(f"--archs: unknown {', '.join(unknown)}; choose from {', '.join(STUDENTS)}")

    bank_files, bank_y = imagenette(args.data, "train", args.bank, args.seed)
    val_files, val_y = imagenette(args.data, "val", args.val, args.seed + 1)
    preprocessed = {}

    def images(spec: InputSpec):
        """The bank and the val split, preprocessed once per preprocessing."""
        key = repr(spec.to_dict())
        if key not in preprocessed:
            preprocessed[key] = (preprocess_batch(bank_files, spec), bank_y), (preprocess_batch(val_files, spec), val_y)
        return preprocessed[key]

    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = {arch: run_arch(arch, folders.get(arch), args, images, Path(tmp)) for arch in archs}
    write_json(
        args.out,
        {
            "benchmark": "export-cpu",
            "machine": {
                "cpu": machine_name(),
                "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
            },
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
            "setup": {
                "latency": {
                    "batches": {"1": args.iters, "32": args.iters_32},
                    "warmup": args.warmup,
                    "order": "4 rounds of one block per backend, each block after its warm-up runs",
                },
                "quality": {
                    "dataset": "imagenette",
                    "queries": f"val, {'all' if args.val is None else args.val} ({len(val_y)} images)",
                    "bank": f"train, {len(bank_y)} images (seed {args.seed})",
                    "knn": {"k": KNN_K, "t": KNN_T},
                    "cosine": "per image, each backend's embedding against PyTorch fp32's",
                },
                "int8_calibration": f"{args.calibration} Imagenette train images (the k-NN bank's first ones); "
                f"keep_float chosen as the export's auto on the next {CHOICE_IMAGES} (min cosine {MIN_COSINE})",
            },
            "models": results,
            "seconds": round(time.time() - started, 1),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
