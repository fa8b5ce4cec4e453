"""fp32 ONNX -> fp16 and int8 (Q/DQ) ONNX.

fp16: weights and compute in half precision, inputs and outputs kept float32
so the runtime feeds every precision the same preprocessed batch.

int8 is quantized for one target, recorded in the manifest, because the fast
int8 kernels of TensorRT and of ONNX Runtime's CPU provider want different graphs:

- ``tensorrt``: symmetric int8 activations and per-channel weights (every zero
  point 0, as TensorRT requires), Q/DQ placed as TensorRT's guide recommends:
  on the inputs of weighted ops (Conv, Gemm, MatMul) and of residual Adds, fp32
  weights behind a QuantizeLinear/DequantizeLinear pair, float biases.
  ONNX Runtime runs it exactly only in its slower u8u8 mode on x86.
- ``onnxruntime``: asymmetric uint8 activations, so each ReLU folds into the
  quantization of its Conv, one Q/DQ pair per consumer, so every Conv fuses to
  QLinearConv, and 7-bit weights (|w| <= 64), so the u8s8 kernels of x86 CPUs
  without VNNI cannot saturate their 16-bit pair sums (255 * 64 * 2 < 32767):
  the fused kernels are exact on every CPU ONNX Runtime runs on.

Either way ``keep_float`` names ops that stay float (``stem``, ``depthwise``,
op types or node-name globs, for ops that lose too much in int8), and the output embedding carries no Q/DQ unless
``quantize_output`` asks for it. By default nothing is kept float: on ResNet-18
at 224 px on an AVX2 CPU, leaving pooling and ReLU float around int8 Conv/Add
ran 1.35x slower than quantizing every op ONNX Runtime fuses, at no accuracy gain.
"""

from __future__ import annotations

import fnmatch
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
TARGETS = ("tensorrt", "onnxruntime")
# TensorRT's placement guide: quantize the inputs of weighted ops and of the residual Add.
TENSORRT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
_SHAPE_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity"}


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


def float_nodes(model: onnx.ModelProto, keep_float: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the nodes a keep_float list selects: an entry is ``stem``, ``depthwise``, an op type
    (``HardSwish``) or a node-name glob (``/features/*/block.2/*``). An entry that selects nothing is an
    error, so a typo cannot pass unnoticed."""
    names = []
    for rule in keep_float:
        hits = selected(model, rule)
        if not hits:
            raise ValueError(f"int8 keep_float entry {rule!r} matches no op type or node name of the model")
        names += hits
    return list(dict.fromkeys(names))


def selected(model: onnx.ModelProto, rule: str) -> list[str]:
    """``stem``: the weighted op reading the image; ``depthwise``: convs with one input channel per group
    (MobileNet's and EfficientNet's, whose per-channel scales each see one 3x3 or 5x5 filter)."""
    nodes = model.graph.node
    if rule == "stem":
        image = model.graph.input[0].name
        return [n.name for n in nodes if image in n.input and n.op_type in TENSORRT_OPS][:1]
    if rule == "depthwise":
        weights = {t.name: t.dims for t in model.graph.initializer}
        return [
            n.name for n in nodes if n.op_type == "Conv" and _group(n) > 1 and weights.get(n.input[1], (0, 0))[1] == 1
        ]
    return [n.name for n in nodes if n.op_type == rule or fnmatch.fnmatchcase(n.name, rule)]


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _float_output(model: onnx.ModelProto) -> None:
    """Drop the activation Q/DQ pairs between the graph outputs and the last op computing them."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    for out in list(outputs):
        name = out
        while (node := producer.get(name)) is not None:
            if node.op_type in _SHAPE_OPS:
                name = node.input[0]
                continue
            quant = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if quant is None or quant.op_type != "QuantizeLinear":
                break
            source = quant.input[0]
            if name in outputs:  # the output keeps its name: read the float tensor through an Identity
                node.CopyFrom(onnx.helper.make_node("Identity", [source], [name], name=f"{node.name}_float"))
            else:
                for consumer in graph.node:
                    consumer.input[:] = [source if i == name else i for i in consumer.input]
                graph.node.remove(node)
            if not any(quant.output[0] in n.input for n in graph.node):
                graph.node.remove(quant)
            producer = {o: n for n in graph.node for o in n.output}
            name = source


def _tidy(model: onnx.ModelProto) -> None:
    """Keep only the initializers and opset imports some node uses (pre-processing leaves com.microsoft behind)."""
    read = {i for n in model.graph.node for i in n.input}
    unused = [t for t in model.graph.initializer if t.name not in read]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    used = {n.domain or "ai.onnx" for n in model.graph.node} | {"ai.onnx"}
    keep = [o for o in model.opset_import if (o.domain or "ai.onnx") in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def to_int8(
    src_onnx: Path | str,
    dst_onnx: Path | str,
    calibration: np.ndarray,
    target: str = "tensorrt",
    keep_float: list[str] | tuple[str, ...] = (),
    quantize_output: bool = False,
) -> dict:
    """Static int8 Q/DQ model for ``target``, calibrated (min/max) on preprocessed images [N, 3, H, W].

    Returns what the manifest records about it: target, number formats, and the nodes kept float.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown int8 target {target!r}; expected one of {', '.join(TARGETS)}")
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    if data.ndim != 4 or data.shape[1] != 3 or len(data) == 0:
        raise ValueError(f"calibration must be a non-empty float32 [N, 3, H, W] array, got shape {data.shape}")
    if len(data) < MIN_CALIBRATION:
        warnings.warn(
            f"int8 calibration on {len(data)} images (< {MIN_CALIBRATION}): activation ranges may be unreliable",
            stacklevel=2,
        )
    input_name = onnx.load(str(src_onnx), load_external_data=False).graph.input[0].name
    tensorrt = target == "tensorrt"
    with tempfile.TemporaryDirectory() as tmpdir:
        prepared, quantized = Path(tmpdir) / "prepared.onnx", Path(tmpdir) / "int8.onnx"
        # Shape inference + graph optimisation first, as ONNX Runtime recommends before quantizing.
        quant_pre_process(str(src_onnx), str(prepared), skip_symbolic_shape=True)
        excluded = float_nodes(onnx.load(str(prepared)), keep_float)
        quantize_static(
            str(prepared),
            str(quantized),
            _ArrayReader(input_name, data),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(TENSORRT_OPS) if tensorrt else None,
            nodes_to_exclude=excluded,
            per_channel=True,
            reduce_range=not tensorrt,
            activation_type=QuantType.QInt8 if tensorrt else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": tensorrt,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "DedicatedQDQPair": True,
                "AddQDQPairToWeight": tensorrt,
                # TensorRT's guide: leave the outputs of weighted ops (and of the Add after them) unquantized
                "OpTypesToExcludeOutputQuantization": list(TENSORRT_OPS) if tensorrt else [],
            },
        )
        model = onnx.load(str(quantized))
    if not quantize_output:
        _float_output(model)
    _tidy(model)
    onnx.checker.check_model(model)
    with atomic.atomic_path(dst_onnx) as tmp:
        onnx.save(model, str(tmp))
    return {
        "target": target,
        "activations": "int8 symmetric" if tensorrt else "uint8 asymmetric",
        "weights": "int8 symmetric per channel",
        "weight_bits": 8 if tensorrt else 7,
        "keep_float": list(keep_float),
        "float_nodes": excluded,
        "output_quantized": quantize_output,
        "calibration": {"images": len(data), "method": "minmax"},
    }
