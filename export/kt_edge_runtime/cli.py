"""`kt-edge-runtime`: verify, build-engine, embed and bench on the device.

Exit codes: 0 success, 1 parity failed, 2 unusable input (bad bundle, missing
TensorRT, bad arguments). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import write_bytes
from .backends import BACKENDS, BackendError, open_backend
from .bundle import BundleError, Manifest, check_verified, load_bundle
from .parity import PRECISIONS

EXIT_FAILED = 1
EXIT_UNUSABLE = 2
PUBLIC_KEY_ENV = "KT_EDGE_PUBLIC_KEY"


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kt-edge-runtime", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def trusted(p: argparse.ArgumentParser) -> None:
        p.add_argument("bundle", type=Path, help="bundle directory (holds manifest.json)")
        p.add_argument(
            "--public-key",
            type=Path,
            default=os.environ.get(PUBLIC_KEY_ENV) or None,
            help=f"Ed25519 public key (PEM): refuse a bundle it did not sign (default ${PUBLIC_KEY_ENV})",
        )
        p.add_argument(
            "--allow-unverified", action="store_true", help="use a bundle whose parity checks failed at export"
        )

    def common(p: argparse.ArgumentParser, precision_default: str | None) -> None:
        trusted(p)
        p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
        p.add_argument("--precision", choices=PRECISIONS, default=precision_default)
        p.add_argument("--providers", default=None, help="onnxruntime providers, e.g. cuda,cpu (default cpu)")
        p.add_argument("--dla-core", type=int, default=None, help="tensorrt: run the engine built for this DLA core")

    p = sub.add_parser("verify", help="check hashes, then golden parity of each model against PyTorch fp32")
    common(p, None)

    p = sub.add_parser("build-engine", help="build a TensorRT engine for this device from the bundle's ONNX")
    trusted(p)
    p.add_argument("--precision", choices=PRECISIONS, required=True)
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--workspace-mib", type=int, default=1024)
    p.add_argument(
        "--dla-core",
        type=int,
        default=None,
        help="build for this DLA core (fp16/int8; one fixed batch: min = opt = max)",
    )
    p.add_argument("--print-trtexec", action="store_true", help="also print the equivalent trtexec command")

    p = sub.add_parser("embed", help="embed image files or folders into an .npy file")
    common(p, "fp32")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=32)

    p = sub.add_parser("bench", help="latency p50/p90/p99 and throughput per batch size")
    common(p, "fp32")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=[1, 8, 32])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def _providers(args: argparse.Namespace) -> list[str] | None:
    return [s.strip() for s in args.providers.split(",")] if args.providers else None


def _trusted_bundle(args: argparse.Namespace) -> Manifest:
    """The bundle's manifest once hashes, signature (given a key) and export verdict all check out."""
    manifest = load_bundle(args.bundle, args.public_key)
    check_verified(manifest, args.allow_unverified)
    return manifest


def _open(args: argparse.Namespace, manifest: Manifest, precision: str):
    return open_backend(args.bundle, manifest, precision, args.backend, _providers(args), args.dla_core)


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_bundle

    manifest = _trusted_bundle(args)
    reports = verify_bundle(args.bundle, args.backend, args.precision, _providers(args), manifest, args.dla_core)
    failed = 0
    for report in reports:
        where = manifest.models[report.precision].file
        print(f"{where} [{args.backend}]: {report.summary()}", file=sys.stdout if report.passed else sys.stderr)
        failed += not report.passed
    return EXIT_FAILED if failed else 0


def _build_engine(args: argparse.Namespace) -> int:
    from .backends.tensorrt import build_engine, import_tensorrt, trtexec_command

    manifest = _trusted_bundle(args)
    manifest.model(args.precision)
    import_tensorrt()
    options = dict(
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_mib=args.workspace_mib,
        dla_core=args.dla_core,
    )
    if args.print_trtexec:
        print(trtexec_command(args.bundle, args.precision, manifest=manifest, **options))
    path = build_engine(args.bundle, args.precision, manifest=manifest, **options)
    print(f"built {path}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    from .embed import collect_images, embed_files, save_embeddings, text_progress

    manifest = _trusted_bundle(args)
    files = collect_images(args.images)
    backend = _open(args, manifest, args.precision)
    progress = text_progress if sys.stderr.isatty() else None
    embeddings = embed_files(backend, manifest.input, files, args.batch_size, progress)
    out = save_embeddings(args.out, embeddings, files)
    print(f"wrote {out}: {embeddings.shape[0]} x {embeddings.shape[1]} float32")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench, machine_name

    manifest = _trusted_bundle(args)
    backend = _open(args, manifest, args.precision)
    if args.backend == "tensorrt":
        from .backends.tensorrt import current_target

        device = current_target().gpu
    else:
        device = machine_name()
    results = []
    c, h, w = manifest.input.shape
    kernels = backend.kernels(np.zeros((max(backend.min_batch, 1), c, h, w), np.float32))
    print(f"{manifest.architecture} {args.precision} on {args.backend} ({device})")
    if "int8" in kernels:
        print(f"kernels: {kernels['int8']}")
    print(f"{'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>9}")
    for batch in args.batch_sizes:
        r = bench(backend, manifest.input.shape, batch, args.iters, args.warmup)
        results.append(r)
        print(f"{r.batch:>5} {r.p50_ms:>9.3f} {r.p90_ms:>9.3f} {r.p99_ms:>9.3f} {r.throughput_ips:>9.1f}")
    if args.json:
        payload = {
            "architecture": manifest.architecture,
            "backend": args.backend,
            "precision": args.precision,
            "model": manifest.models[args.precision].file,
            "device": device,
            "providers": getattr(backend, "providers", None),
            "kernels": kernels,
            "results": [r.to_dict() for r in results],
        }
        write_bytes(args.json, (json.dumps(payload, indent=2) + "\n").encode())
    return 0


_COMMANDS = {"verify": _verify, "build-engine": _build_engine, "embed": _embed, "bench": _bench}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (BundleError, BackendError, ValueError, FileNotFoundError) as exc:
        print(f"kt-edge-runtime: error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
