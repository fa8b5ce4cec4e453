"""fp32 ONNX -> fp16 and int8 (Q/DQ) ONNX, in forms TensorRT builds without a calibrator.

fp16: weights and compute in half precision, inputs and outputs kept float32
so the runtime feeds every precision the same preprocessed batch.
int8: ONNX Runtime static quantization in QDQ format, per-channel weights,
symmetric int8 weights and activations (every zero point 0, as TensorRT
requires) and float biases (TensorRT's DequantizeLinear takes int8 only).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxslim
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from kt_edge import atomic

MIN_CALIBRATION = 300
CALIBRATION_BATCH = 32


def to_fp16(src_onnx: Path | str, dst_onnx: Path | str) -> None:
    """Half-precision weights and compute; float32 graph inputs and outputs."""
    model = onnx.load(str(src_onnx))
    half = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends the input casts after their consumers; onnxslim restores
    # topological order, which the checker and TensorRT's ONNX parser require.
    half = onnxslim.slim(half)
    onnx.checker.check_model(half)
    with atomic.atomic_path(dst_onnx) as tmp:
        onnx.save(half, str(tmp))


class _ArrayReader(CalibrationDataReader):
    """Feeds the calibration array to ONNX Runtime's calibrator in fixed-size batches."""

    def __init__(self, input_name: str, data: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self._batches = iter([{input_name: data[i : i + batch_size]} for i in range(0, len(data), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def to_int8(src_onnx: Path | str, dst_onnx: Path | str, calibration: np.ndarray) -> None:
    """Static int8 Q/DQ model calibrated (min/max) on preprocessed images [N, 3, H, W]."""
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    if data.ndim != 4 or data.shape[1] != 3 or len(data) == 0:
        raise ValueError(f"calibration must be a non-empty float32 [N, 3, H, W] array, got shape {data.shape}")
    if len(data) < MIN_CALIBRATION:
        warnings.warn(
            f"int8 calibration on {len(data)} images (< {MIN_CALIBRATION}): activation ranges may be unreliable",
            stacklevel=2,
        )
    input_name = onnx.load(str(src_onnx), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmpdir:
        prepared = Path(tmpdir) / "prepared.onnx"
        # Shape inference + graph optimisation first, as ONNX Runtime recommends before quantizing.
        quant_pre_process(str(src_onnx), str(prepared), skip_symbolic_shape=True)
        with atomic.atomic_path(dst_onnx) as tmp:
            quantize_static(
                str(prepared),
                str(tmp),
                _ArrayReader(input_name, data),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
            )
            onnx.checker.check_model(str(tmp))
