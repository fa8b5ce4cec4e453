"""Host-side fp16 / int8 conversion: the forms TensorRT needs (fp32 I/O, symmetric Q/DQ, zero points 0)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from kt_edge.export.quantize import to_int8


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]


def test_fp16_keeps_float32_io_and_halves_weights(bundle):
    fp32 = onnx.load(str(bundle / "model.fp32.onnx"))
    fp16 = onnx.load(str(bundle / "model.fp16.onnx"))
    onnx.checker.check_model(fp16)
    assert io_types(fp16) == [TensorProto.FLOAT, TensorProto.FLOAT]
    conv_weights = [initializers(fp16)[n.input[1]] for n in fp16.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w.data_type == TensorProto.FLOAT16 for w in conv_weights)
    assert (bundle / "model.fp16.onnx").stat().st_size < 0.6 * (bundle / "model.fp32.onnx").stat().st_size
    assert len([n for n in fp32.graph.node if n.op_type == "Conv"]) == len(conv_weights)


def test_int8_is_symmetric_qdq_with_zero_points_zero(bundle):
    model = onnx.load(str(bundle / "model.int8.onnx"))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"} & set(ops)  # QDQ, not QOperator
    assert io_types(model) == [TensorProto.FLOAT, TensorProto.FLOAT]

    inits = initializers(model)
    zero_points = [n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert zero_points and all(z in inits for z in zero_points)
    for name in zero_points:
        assert inits[name].data_type == TensorProto.INT8, name
        assert not numpy_helper.to_array(inits[name]).any(), f"{name} is not zero"
    # every Conv reads int8 weights through a per-channel DequantizeLinear
    producers = {o: n for n in model.graph.node for o in n.output}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear"
        assert inits[dq.input[0]].data_type == TensorProto.INT8
        assert len(numpy_helper.to_array(inits[dq.input[1]])) > 1  # one scale per output channel
        # biases stay float: TensorRT's DequantizeLinear accepts int8 only
        if len(conv.input) > 2:
            assert conv.input[2] in inits and inits[conv.input[2]].data_type == TensorProto.FLOAT


def test_small_calibration_set_warns(bundle, tmp_path):
    calibration = np.load(bundle / "calibration.npy")[:8]
    with pytest.warns(UserWarning, match="calibration on 8 images"):
        to_int8(bundle / "model.fp32.onnx", tmp_path / "int8.onnx", calibration)
    assert (tmp_path / "int8.onnx").is_file()


def test_bad_calibration_shape_is_refused(bundle, tmp_path):
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        to_int8(bundle / "model.fp32.onnx", tmp_path / "int8.onnx", np.zeros((4, 32, 32), np.float32))
    assert not (tmp_path / "int8.onnx").exists()
