"""Which ops of a student stay float in int8, chosen by measurement (``export.int8.keep_float: auto``).

A short ladder, fastest first: every op int8; then the stem float (it reads the image, whose range no
activation scale shares); then also the depthwise convs (a per-channel scale there covers one 3x3 or
5x5 filter). The first rung whose int8 model keeps the bundle's min cosine against PyTorch on held-out
train images wins; when none does, the best one, and the bundle's own checks on the test split say so.
The choice is made on train images so the test split stays an unbiased check of it.

Measured on the quick start's students (CIFAR sample, 32 px, 500 test images, TensorRT target): min
cosine with every op int8 0.993 (MobileNetV3-Large), 0.963 (MobileNetV3-Small), 0.9997 (EfficientNet-B0);
MobileNetV3-Small rose to 0.975 with the stem float and 0.978 with its depthwise convs float.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from kt_edge_runtime.backends import run_batched
from kt_edge_runtime.backends.onnxruntime import OrtBackend
from kt_edge_runtime.parity import Thresholds, golden_parity

from kt_edge.export.quantize import selected, to_int8

LADDER = ((), ("stem",), ("stem", "depthwise"))


def rungs(src_onnx: Path | str) -> list[tuple[str, ...]]:
    """The ladder's rungs that apply to this model: a rung that keeps no more nodes float than the one
    below it (ResNet-18 has no depthwise conv) is left out."""
    model = onnx.load(str(src_onnx), load_external_data=False)
    hits = {rule: selected(model, rule) for rung in LADDER for rule in rung}
    out, seen = [], None
    for rung in LADDER:
        rules = tuple(rule for rule in rung if hits[rule])
        nodes = {name for rule in rules for name in hits[rule]}
        if nodes != seen:
            out.append(rules)
            seen = nodes
    return out


def choose_int8(
    src_onnx: Path | str,
    dst_onnx: Path | str,
    calibration: np.ndarray,
    images: np.ndarray,
    reference: np.ndarray,
    min_cosine: float,
    target: str = "tensorrt",
    quantize_output: bool = False,
) -> dict:
    """Quantize ``src_onnx`` rung by rung, measuring each against ``reference`` (PyTorch's embeddings of
    ``images``); leaves the chosen int8 model at ``dst_onnx`` and returns its record, with every try."""
    tries, best = [], None
    for rung in rungs(src_onnx):
        record = to_int8(src_onnx, dst_onnx, calibration, target, rung, quantize_output)
        backend = OrtBackend(dst_onnx, exact_int8=record["weight_bits"] > 7)
        report = golden_parity(reference, run_batched(backend, images), "int8", Thresholds(min_cosine=min_cosine))
        tries.append({"keep_float": list(rung), "min_cosine": report.min_cosine, "p1_cosine": report.p1_cosine})
        if best is None or report.min_cosine > best[1]["min_cosine"]:
            best = (record, tries[-1])
        if report.min_cosine >= min_cosine:
            break
    record, chosen = best
    if chosen is not tries[-1]:  # none passed and the best was not the last: quantize it again
        record = to_int8(src_onnx, dst_onnx, calibration, target, tuple(chosen["keep_float"]), quantize_output)
    record["choice"] = {"images": len(images), "min_cosine": min_cosine, "tries": tries}
    return record
