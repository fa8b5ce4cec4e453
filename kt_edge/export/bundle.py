"""Assemble a device bundle and prove it matches PyTorch before calling it verified.

For each precision: golden parity (the bundle's golden inputs through ONNX Runtime against the
PyTorch fp32 outputs), split parity (the same thresholds over every image of the labelled test
split, whose cosine distribution the manifest records) and accuracy parity (k-NN top-1 of the
exported model against PyTorch's). The checks are ``kt_edge_runtime``'s own, so the device runs
the same. Calibration images stay on the host: the manifest records how many and their digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from kt_edge_runtime.backends.onnxruntime import OrtBackend
from kt_edge_runtime.bundle import (
    MANIFEST_NAME,
    Golden,
    InputSpec,
    Manifest,
    ModelEntry,
    OutputSpec,
    Parity,
    write_manifest,
)
from kt_edge_runtime.parity import Thresholds, accuracy_parity, golden_parity, knn_top1
from kt_edge_runtime.signing import SIGNATURE_NAME, SignatureError, load_private_key, sign_manifest

from kt_edge import atomic
from kt_edge.errors import KtEdgeError
from kt_edge.export.onnx import INPUT_NAME, OUTPUT_NAME, export_fp32
from kt_edge.features import embed_with
from kt_edge.models.checkpoint import load_backbone

KNN_K, KNN_T = 200, 0.1


class ParityError(KtEdgeError):
    """An exported model does not match PyTorch: the bundle is written but not marked verified."""


def _thresholds(cfg) -> dict[str, Thresholds]:
    return {
        "fp32": Thresholds(
            min_cosine=cfg.min_cosine_fp32, rtol=cfg.rtol, atol=cfg.atol, max_top1_drop=cfg.max_knn_drop
        ),
        "fp16": Thresholds(min_cosine=cfg.min_cosine_fp16, max_top1_drop=cfg.max_knn_drop),
        "int8": Thresholds(min_cosine=cfg.min_cosine_int8, max_top1_drop=cfg.max_knn_drop),
    }


def _pick(n: int, count: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(count, n), replace=False))


def _stack(dataset, indices) -> tuple[np.ndarray, np.ndarray]:
    items = [dataset[int(i)] for i in indices]
    return torch.stack([x for x, _ in items]).numpy(), np.array([y for _, y in items])


def _numpy_in(run):
    """An ONNX backend (numpy in, numpy out) as a runner of torch batches."""
    return lambda images: run(images.numpy())


def _version() -> str:
    try:
        return version("kt-edge")
    except PackageNotFoundError:
        return "unknown"


def _cosines(report) -> dict:
    """The per-image cosine distribution a split-parity report summarises, for the manifest."""
    return {"images": report.samples, "min": report.min_cosine, "p1": report.p1_cosine, "median": report.median_cosine}


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def _int8(model, fp32: Path, dst: Path, train_set, cfg, seed: int) -> dict:
    """Calibrate on train images; with ``keep_float: auto``, choose the float ops on other train images."""
    from kt_edge.export.int8_choice import choose_int8
    from kt_edge.export.quantize import to_int8

    picked = _pick(len(train_set), cfg.calibration, seed + 1)
    calib_x = _stack(train_set, picked)[0].astype(np.float32)
    int8 = cfg.int8
    try:
        if int8.keep_float == "auto":
            rest = np.setdiff1d(np.arange(len(train_set)), picked)
            pool = rest if len(rest) else picked  # a train split no larger than the calibration set: reuse it
            held_out = _stack(train_set, pool[_pick(len(pool), int8.choice_images, seed + 2)])[0]
            with torch.no_grad():
                reference = model(torch.from_numpy(held_out)).numpy()
            record = choose_int8(
                fp32, dst, calib_x, held_out, reference, cfg.min_cosine_int8, int8.target, int8.quantize_output
            )
            record["choice"].update(split=train_set.name, seed=seed + 2)
        else:
            record = to_int8(fp32, dst, calib_x, int8.target, int8.keep_float, int8.quantize_output)
    except ValueError as exc:
        raise KtEdgeError(f"export.int8: {exc}") from None
    record["calibration"].update(
        split=train_set.name, seed=seed + 1, sha256=hashlib.sha256(calib_x.tobytes()).hexdigest()
    )
    return record


def build_bundle(student_dir: Path, bundle_dir: Path, train_set, test_set, cfg, seed: int, provenance: dict) -> dict:
    """Write the bundle, check every precision, and raise ParityError naming the worst sample on failure."""
    bundle_dir = Path(bundle_dir)
    try:
        signer = load_private_key(cfg.sign_key) if cfg.sign_key is not None else None
    except SignatureError as exc:
        raise KtEdgeError(f"export.sign_key: {exc}") from None
    (bundle_dir / "golden").mkdir(parents=True, exist_ok=True)
    # The manifest marks a bundle complete: drop the old one (and its signature) before any file it vouches for changes.
    (bundle_dir / MANIFEST_NAME).unlink(missing_ok=True)
    (bundle_dir / SIGNATURE_NAME).unlink(missing_ok=True)
    model, card = load_backbone(student_dir)
    model = model.cpu().eval()
    size = card["image_size"]

    golden_x, _ = _stack(test_set, _pick(len(test_set), cfg.golden, seed))
    with torch.no_grad():
        golden_y = model(torch.from_numpy(golden_x)).numpy()
    _save_npy(bundle_dir / "golden" / "inputs.npy", golden_x.astype(np.float32))
    _save_npy(bundle_dir / "golden" / "outputs.npy", golden_y.astype(np.float32))

    files = {"fp32": bundle_dir / "model.fp32.onnx"}
    export_fp32(model, files["fp32"], size, cfg.opset)
    quantization = {}
    if "fp16" in cfg.precisions:
        from kt_edge.export.quantize import to_fp16

        files["fp16"] = bundle_dir / "model.fp16.onnx"
        to_fp16(files["fp32"], files["fp16"])
    if "int8" in cfg.precisions:
        files["int8"] = bundle_dir / "model.int8.onnx"
        quantization["int8"] = _int8(model, files["fp32"], files["int8"], train_set, cfg, seed)

    entries = {
        p: ModelEntry(file=f.name, input_name=INPUT_NAME, output_name=OUTPUT_NAME, quantization=quantization.get(p))
        for p, f in files.items()
    }
    # checked on the kernels the device's ONNX Runtime picks for the file: fused, exact mode for full-range int8
    backends = {p: OrtBackend(f, exact_int8=entries[p].full_range_int8) for p, f in files.items()}
    thresholds = _thresholds(cfg)
    results, failures = {}, []
    for precision, backend in backends.items():
        report = golden_parity(golden_y, backend.run(golden_x), precision, thresholds[precision])
        results[precision] = {"golden": report.to_dict()}
        if not report.passed:
            failures.append(f"{files[precision].name} golden: {report.summary()}")

    def torch_run(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(images).numpy()

    runners = {"pytorch": torch_run, **{p: _numpy_in(b.run) for p, b in backends.items()}}
    (bank, bank_y), (test, test_y) = (
        embed_with(runners, split, description=f"parity on {len(split)} images of {split.name}")
        for split in (train_set, test_set)
    )
    reference = knn_top1(bank["pytorch"], bank_y, test["pytorch"], test_y, k=KNN_K, t=KNN_T)
    for precision in backends:
        split = golden_parity(test["pytorch"], test[precision], precision, thresholds[precision])
        results[precision]["split"] = {**split.to_dict(), "split": test_set.name, "cosine": _cosines(split)}
        if not split.passed:
            failures.append(f"{files[precision].name} on {test_set.name}: {split.summary()}")
        acc = accuracy_parity(
            reference,
            knn_top1(bank[precision], bank_y, test[precision], test_y, k=KNN_K, t=KNN_T),
            thresholds[precision].max_top1_drop,
        )
        results[precision]["accuracy"] = {**acc.to_dict(), "k": KNN_K, "t": KNN_T, "split": test_set.name}
        results[precision]["passed"] = results[precision]["golden"]["passed"] and split.passed and acc.passed
        if not acc.passed:
            failures.append(f"{files[precision].name}: {acc.summary()}")

    manifest = Manifest(
        architecture=card["arch"],
        input=InputSpec(
            shape=(3, size, size),
            resize=card["resize"],
            crop=card["crop"],
            mean=tuple(card["mean"]),
            std=tuple(card["std"]),
        ),
        output=OutputSpec(name=OUTPUT_NAME, dim=card["embed_dim"], normalized=False),
        models=entries,
        golden=Golden(inputs="golden/inputs.npy", outputs="golden/outputs.npy"),
        parity=Parity(thresholds={p: thresholds[p] for p in files}, results=results),
        provenance=provenance,
        verified=not failures,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        kt_edge_version=_version(),
    )
    write_manifest(bundle_dir, manifest)
    if signer is not None:
        sign_manifest(bundle_dir, signer)
    if failures:
        raise ParityError(f"export parity failed, bundle {bundle_dir} not verified: " + " | ".join(failures))
    return {"bundle": str(bundle_dir), "results": results}
