"""Exported student speed and quality on this CPU: PyTorch eager fp32 vs ONNX Runtime fp32 and int8.

For each architecture at 224 px, in one run and one process:
- latency at batch 1 (median, p90, min) and the ratios the targets name, timed round-robin across backends;
- quality over the whole Imagenette val split: the per-image cosine of each backend's embeddings against
  PyTorch's (min, 1st percentile, median) and weighted k-NN top-1 (k=200, T=0.1) with a train-split bank.

int8 is quantized for both targets: "onnxruntime" (uint8 activations, 7-bit weights: ONNX Runtime's fused
CPU kernels, exact on every CPU) and "tensorrt" (symmetric int8 for TensorRT, which ONNX Runtime runs
exactly only in its u8u8 mode on x86). The JSON records which kernels ran (ONNX Runtime's profiler).

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
from kt_edge_runtime.backends.onnxruntime import OrtBackend
from kt_edge_runtime.bench import machine_name
from kt_edge_runtime.bundle import InputSpec
from kt_edge_runtime.parity import golden_parity, knn_top1
from kt_edge_runtime.preprocess import preprocess_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kt_edge.atomic import write_json  # noqa: E402
from kt_edge.export.onnx import export_fp32  # noqa: E402
from kt_edge.export.quantize import to_int8  # noqa: E402
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


def imagenette(data: Path, split: str, count: int | None, seed: int) -> tuple[list[Path], np.ndarray]:
    """Files and labels of an Imagenette split: all of them when count is None, else a seeded sample."""
    root = data / "imagenette" / split
    if not root.is_dir():
        raise SystemExit(f"Imagenette not found under {root}: pass --data")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).glob("*.jpg"))]
    pick = np.arange(len(files)) if count is None else np.random.default_rng(seed).choice(len(files), count, False)
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


def interleaved_latency(runners: dict, shape, batch: int, iters: int, warmup: int) -> dict[str, dict]:
    """Round-robin timing: iteration i of every backend runs back to back, so load from other
    processes on the machine hits all backends alike and the ratios stay fair."""
    x = np.random.default_rng(batch).standard_normal((batch, *shape), dtype=np.float32)
    times = {name: [] for name in runners}
    for i in range(warmup + iters):
        for name, runner in runners.items():
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
            "iters": iters,
        }
    return out


def embed(runner, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate([runner.run(images[i : i + batch]) for i in range(0, len(images), batch)])


def run_arch(arch: str, folder: Path | None, args, spec: InputSpec, bank, val, workdir: Path) -> dict:
    (bank_x, bank_y), (val_x, val_y) = bank, val
    model, weights = student(arch, folder, args.size, bank_x[:64])
    fp32 = workdir / f"{arch}.fp32.onnx"
    export_fp32(model, fp32, args.size)
    records = {}
    for target in ("onnxruntime", "tensorrt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records[target] = to_int8(fp32, workdir / f"{arch}.int8-{target}.onnx", bank_x[: args.calibration], target)
    runners = {
        "pytorch-fp32": TorchRunner(model),
        "ort-fp32": OrtBackend(fp32),
        "ort-int8": OrtBackend(workdir / f"{arch}.int8-onnxruntime.onnx", exact_int8=False),
        "ort-int8-tensorrt-target": OrtBackend(workdir / f"{arch}.int8-tensorrt.onnx", exact_int8=True),
    }
    one = val_x[:1]
    kernels = {name: r.kernels(one) for name, r in runners.items() if isinstance(r, OrtBackend)}
    latency = interleaved_latency(runners, spec.shape, 1, args.iters, args.warmup)
    for name, r in latency.items():
        print(f"{arch:9s} {name:25s} batch 1: p50 {r['p50_ms']:8.2f} ms  {r['throughput_ips']:7.1f} img/s", flush=True)
    ratios = {
        f"{other}_over_{name}": latency[other]["p50_ms"] / latency[name]["p50_ms"]
        for name in runners
        for other in ("pytorch-fp32", "ort-fp32")
        if other != name
    }

    embeddings = {}
    for name in ("pytorch-fp32", "ort-int8", "ort-int8-tensorrt-target"):
        started = time.time()
        embeddings[name] = (embed(runners[name], bank_x), embed(runners[name], val_x))
        print(
            f"{arch:9s} {name:25s} embedded {len(bank_x) + len(val_x)} images in {time.time() - started:.0f} s",
            flush=True,
        )
    reference = embeddings["pytorch-fp32"][1]
    quality = {}
    for name, (b, v) in embeddings.items():
        report = golden_parity(reference, v, "int8")
        quality[name] = {
            "knn_top1": knn_top1(b, bank_y, v, val_y, k=KNN_K, t=KNN_T),
            "cosine_vs_pytorch": {
                "images": report.samples,
                "min": report.min_cosine,
                "p1": report.p1_cosine,
                "median": report.median_cosine,
            },
        }
        q = quality[name]
        print(
            f"{arch:9s} {name:25s} k-NN top-1 {q['knn_top1']:6.2f}  cosine vs PyTorch min "
            f"{report.min_cosine:.4f} p1 {report.p1_cosine:.4f} median {report.median_cosine:.5f}",
            flush=True,
        )
    sizes = {p.name.split(".", 1)[1]: p.stat().st_size / 2**20 for p in sorted(workdir.glob(f"{arch}.*.onnx"))}
    return {
        "weights": weights,
        "onnx_mib": sizes,
        "int8_quantization": records,
        "kernels": kernels,
        "latency_batch1": latency,
        "p50_ratios_batch1": ratios,
        "quality": quality,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--archs", default="resnet18", help="comma-separated: resnet18,alexnet")
    parser.add_argument("--resnet18", type=Path, default=None, help="student checkpoint folder")
    parser.add_argument("--alexnet", type=Path, default=None, help="student checkpoint folder")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bank", type=int, default=1000, help="k-NN bank size (Imagenette train sample)")
    parser.add_argument("--val", type=int, default=None, help="val images (default: the whole split)")
    parser.add_argument("--calibration", type=int, default=512, help="int8 calibration images (from the bank)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "export-cpu.json")
    args = parser.parse_args()

    spec = InputSpec(
        shape=(3, args.size, args.size), resize=args.size * 8 // 7, crop=args.size, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    bank_files, bank_y = imagenette(args.data, "train", args.bank, args.seed)
    val_files, val_y = imagenette(args.data, "val", args.val, args.seed + 1)
    bank = (preprocess_batch(bank_files, spec), bank_y)
    val = (preprocess_batch(val_files, spec), val_y)

    started, load_before = time.time(), os.getloadavg()
    results = {}
    folders = {"resnet18": args.resnet18, "alexnet": args.alexnet}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            results[arch] = run_arch(arch, folders[arch], args, spec, bank, val, Path(tmp))
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
                "image_size": args.size,
                "preprocess": spec.to_dict(),
                "latency": {"batch": 1, "iters": args.iters, "warmup": args.warmup, "order": "round-robin"},
                "quality": {
                    "dataset": "imagenette",
                    "queries": f"val, {'all' if args.val is None else args.val} ({len(val_y)} images)",
                    "bank": f"train, {len(bank_y)} images (seed {args.seed})",
                    "knn": {"k": KNN_K, "t": KNN_T},
                    "cosine": "per image, each backend's embedding against PyTorch fp32's",
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
