"""Exported student speed and quality on this CPU: PyTorch eager fp32 vs ONNX Runtime fp32 / fp16 / int8.

For each architecture (ResNet-18, AlexNet) at 224 px, in one run and one process:
- latency per batch (median, p90, min) and throughput at batch 1 and 32, timed round-robin across backends;
- quality: weighted k-NN top-1 (k=200, T=0.1) on Imagenette embeddings from each backend, and the lowest
  cosine of each backend's embeddings against PyTorch's.

int8 is timed with ONNX Runtime's fused int8 kernels. On x86 CPUs without VNNI those kernels can saturate,
so int8 quality is reported twice: with those kernels ("int8-fused") and with the Q/DQ graph's exact
arithmetic ("int8", what TensorRT's int8 engine computes).

Weights: a student checkpoint folder per architecture (--resnet18 / --alexnet), else random initialisation
(BatchNorm statistics fitted on 64 Imagenette train images) -- the JSON says which.

    python benchmarks/export.py                       # writes benchmarks/results/export-cpu.json
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
from kt_edge_runtime.backends.onnxruntime import OrtBackend, int8_kernels_saturate
from kt_edge_runtime.bench import machine_name
from kt_edge_runtime.bundle import InputSpec
from kt_edge_runtime.parity import knn_top1
from kt_edge_runtime.preprocess import preprocess_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kt_edge.atomic import write_json  # noqa: E402
from kt_edge.export.onnx import export_fp32  # noqa: E402
from kt_edge.export.quantize import to_fp16, to_int8  # noqa: E402
from kt_edge.models.backbones import build_backbone  # noqa: E402
from kt_edge.models.checkpoint import load_backbone  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KNN_K, KNN_T = 200, 0.1


class TorchRunner:
    """PyTorch eager fp32 with the same .run(batch) interface as the ONNX Runtime backends."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model.eval()

    def run(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()


def imagenette(data: Path, split: str, count: int, seed: int) -> tuple[list[Path], np.ndarray]:
    root = data / "imagenette" / split
    if not root.is_dir():
        raise SystemExit(f"Imagenette not found under {root}: pass --data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).glob("*.jpg"))]
    pick = np.random.default_rng(seed).choice(len(files), count, replace=False)
    return [files[i][0] for i in pick], np.array([files[i][1] for i in pick])


def student(arch: str, folder: Path | None, size: int, bn_images: np.ndarray) -> tuple[torch.nn.Module, str]:
    if folder is not None:
        model, _ = load_backbone(folder)
        return model.cpu().eval(), f"student checkpoint {folder}"
    torch.manual_seed(0)
    model = build_backbone(arch, size)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if bns:
        for m in bns:
            m.momentum = None  # cumulative average
        model.train()
        with torch.no_grad():
            model(torch.from_numpy(bn_images))
        return model.eval(), f"random init (seed 0), BatchNorm statistics from {len(bn_images)} Imagenette train images"
    return model.eval(), "random init (seed 0)"


def interleaved_latency(runners: dict, shape, batch_sizes, iters: int, warmup: int) -> dict[str, dict[str, dict]]:
    """Round-robin timing: iteration i of every backend runs back to back, so load from other
    processes on the machine hits all backends alike and the ratios stay fair."""
    out: dict[str, dict[str, dict]] = {name: {} for name in runners}
    for batch in batch_sizes:
        x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
        times = {name: [] for name in runners}
        for i in range(warmup + iters):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner.run(x)
                if i >= warmup:
                    times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            p50, p90 = np.percentile(t, [50, 90]) * 1e3
            out[name][str(batch)] = {
                "p50_ms": float(p50),
                "p90_ms": float(p90),
                "min_ms": float(min(t) * 1e3),
                "throughput_ips": float(batch / np.median(t)),
                "iters": iters,
            }
    return out


def embed(runner, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([runner.run(images[i : i + batch]) for i in range(0, len(images), batch)])


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min())


def run_arch(arch: str, folder: Path | None, args, spec: InputSpec, train, test, workdir: Path) -> dict:
    (train_x, train_y), (test_x, test_y) = train, test
    model, weights = student(arch, folder, args.size, train_x[:64])
    fp32 = workdir / f"{arch}.fp32.onnx"
    export_fp32(model, fp32, args.size)
    to_fp16(fp32, workdir / f"{arch}.fp16.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_int8(fp32, workdir / f"{arch}.int8.onnx", train_x[: args.calibration])
    runners = {
        "pytorch-fp32": TorchRunner(model),
        "ort-fp32": OrtBackend(fp32),
        "ort-fp16": OrtBackend(workdir / f"{arch}.fp16.onnx"),
        "ort-int8": OrtBackend(workdir / f"{arch}.int8.onnx", exact_qdq=False),
    }
    exact_int8 = OrtBackend(workdir / f"{arch}.int8.onnx", exact_qdq=True)

    latency = interleaved_latency(runners, spec.shape, args.batch_sizes, args.iters, args.warmup)
    for name in runners:
        for batch, r in latency[name].items():
            print(
                f"{arch:9s} {name:13s} batch {batch:>3s}: p50 {r['p50_ms']:9.2f} ms  {r['throughput_ips']:8.1f} img/s"
            )
    speedup = {
        name: {b: latency["pytorch-fp32"][b]["p50_ms"] / latency[name][b]["p50_ms"] for b in latency["pytorch-fp32"]}
        for name in runners
    }

    quality_runners = {**runners, "ort-int8-exact": exact_int8}
    quality = {}
    reference = None
    for name, runner in quality_runners.items():
        bank, queries = embed(runner, train_x), embed(runner, test_x)
        if reference is None:
            reference = queries
        quality[name] = {
            "knn_top1": knn_top1(bank, train_y, queries, test_y, k=KNN_K, t=KNN_T),
            "min_cosine_vs_pytorch": min_cosine(queries, reference),
        }
        print(
            f"{arch:9s} {name:15s} k-NN top-1 {quality[name]['knn_top1']:6.2f}  "
            f"min cosine vs PyTorch {quality[name]['min_cosine_vs_pytorch']:.6f}"
        )
    sizes = {p: (workdir / f"{arch}.{p}.onnx").stat().st_size / 2**20 for p in ("fp32", "fp16", "int8")}
    return {
        "weights": weights,
        "onnx_mib": sizes,
        "latency": latency,
        "speedup_vs_pytorch_p50": speedup,
        "quality": quality,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--resnet18", type=Path, default=None, help="student checkpoint folder")
    parser.add_argument("--alexnet", type=Path, default=None, help="student checkpoint folder")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train", type=int, default=500, help="k-NN bank size (Imagenette train)")
    parser.add_argument("--test", type=int, default=250, help="k-NN queries (Imagenette val)")
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export-cpu.json")
    args = parser.parse_args()

    spec = InputSpec(
        shape=(3, args.size, args.size), resize=args.size * 8 // 7, crop=args.size, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    train_files, train_y = imagenette(args.data, "train", args.train, args.seed)
    test_files, test_y = imagenette(args.data, "val", args.test, args.seed + 1)
    train = (preprocess_batch(train_files, spec), train_y)
    test = (preprocess_batch(test_files, spec), test_y)

    started, load_before = time.time(), os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, folder in (("resnet18", args.resnet18), ("alexnet", args.alexnet)):
            results[arch] = run_arch(arch, folder, args, spec, train, test, Path(tmp))
    write_json(
        args.out,
        {
            "benchmark": "export-cpu",
            "machine": {
                "cpu": machine_name(),
                "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "int8_kernels_saturate": int8_kernels_saturate(),
                "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
            },
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
            "setup": {
                "image_size": args.size,
                "preprocess": spec.to_dict(),
                "batch_sizes": args.batch_sizes,
                "iters": args.iters,
                "warmup": args.warmup,
                "knn": {
                    "k": KNN_K,
                    "t": KNN_T,
                    "dataset": "imagenette",
                    "bank": f"train, {args.train} images",
                    "queries": f"val, {args.test} images",
                    "seed": args.seed,
                },
                "int8_calibration": f"{args.calibration} Imagenette train images (the k-NN bank's first ones)",
            },
            "models": results,
            "seconds": round(time.time() - started, 1),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
