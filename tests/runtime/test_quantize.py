"""Host-side fp16 / int8 conversion: the graphs TensorRT and ONNX Runtime's fast int8 kernels need."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from kt_edge_runtime.backends.onnxruntime import OrtBackend
from onnx import TensorProto, numpy_helper

from kt_edge.export.quantize import to_int8


def initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def io_types(model: onnx.ModelProto) -> list[int]:
    return [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)]


def quantized_inputs(model: onnx.ModelProto) -> dict[str, list[str]]:
    """op type -> names of nodes that read an activation through a DequantizeLinear."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = initializers(model)
    out: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            dq = producers.get(name)
            if node.op_type != "QuantizeLinear" and dq is not None and dq.op_type == "DequantizeLinear":
                q = producers.get(dq.input[0])
                if q is not None and q.input[0] not in inits:  # an activation, not a weight
                    out.setdefault(node.op_type, []).append(node.name)
    return out


def int8(src, dst, calibration, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 calibration images: the small-set warning is expected here
        return to_int8(src, dst, calibration, **options)


@pytest.fixture(scope="module")
def cpu_int8(bundle, calibration, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "cpu.int8.onnx"
    record = int8(bundle / "model.fp32.onnx", path, calibration, target="onnxruntime")
    return path, record


def test_fp16_keeps_float32_io_and_halves_weights(bundle):
    fp32 = onnx.load(str(bundle / "model.fp32.onnx"))
    fp16 = onnx.load(str(bundle / "model.fp16.onnx"))
    onnx.checker.check_model(fp16)
    assert io_types(fp16) == [TensorProto.FLOAT, TensorProto.FLOAT]
    conv_weights = [initializers(fp16)[n.input[1]] for n in fp16.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(w.data_type == TensorProto.FLOAT16 for w in conv_weights)
    assert (bundle / "model.fp16.onnx").stat().st_size < 0.6 * (bundle / "model.fp32.onnx").stat().st_size
    assert len([n for n in fp32.graph.node if n.op_type == "Conv"]) == len(conv_weights)


def test_tensorrt_int8_follows_tensorrts_qdq_placement(bundle):
    model = onnx.load(str(bundle / "model.int8.onnx"))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert not {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"} & set(ops)  # QDQ, not QOperator
    assert io_types(model) == [TensorProto.FLOAT, TensorProto.FLOAT]
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]  # no unused com.microsoft import

    inits = initializers(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for node in qdq:  # symmetric: every zero point an int8 0, as TensorRT requires
        assert inits[node.input[2]].data_type == TensorProto.INT8, node.name
        assert not numpy_helper.to_array(inits[node.input[2]]).any(), node.name
    # Q/DQ only in front of weighted ops and the residual Add: none around ReLU, pooling or the output
    assert set(quantized_inputs(model)) == {"Conv", "Add"}
    assert len(quantized_inputs(model)["Conv"]) == ops.count("Conv")
    producers = {o: n for n in model.graph.node for o in n.output}
    assert producers[model.graph.output[0].name].op_type == "Flatten"
    # weights: fp32 through a QuantizeLinear -> per-channel DequantizeLinear pair; biases float
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        dq = producers[conv.input[1]]
        q = producers[dq.input[0]]
        assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
        assert inits[q.input[0]].data_type == TensorProto.FLOAT and len(inits[q.input[0]].dims) == 4
        assert len(numpy_helper.to_array(inits[dq.input[1]])) > 1  # one scale per output channel
        if len(conv.input) > 2:
            assert inits[conv.input[2]].data_type == TensorProto.FLOAT


def test_onnxruntime_int8_fuses_every_conv_and_cannot_saturate(bundle, cpu_int8):
    path, record = cpu_int8
    assert record["target"] == "onnxruntime" and record["weight_bits"] == 7
    model = onnx.load(str(path))
    inits = initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for conv in convs:
        weights = numpy_helper.to_array(inits[producers[conv.input[1]].input[0]])
        assert weights.dtype == np.int8 and np.abs(weights.astype(int)).max() <= 64  # 255*64*2 < 2**15
    assert "Relu" not in {n.op_type for n in model.graph.node}  # folded into uint8 quantization
    x = np.load(bundle / "golden" / "inputs.npy")
    kernels = OrtBackend(path, exact_int8=False).kernels(x[:1])
    assert kernels["ops"].get("QLinearConv") == len(convs) and "Conv" not in kernels["ops"]


def test_onnxruntime_int8_fast_path_is_as_close_to_pytorch_as_exact_qdq(bundle, cpu_int8):
    """The fused kernels lose nothing against the Q/DQ graph's own arithmetic (only requantization rounding)."""
    path, _ = cpu_int8
    x, y = np.load(bundle / "golden" / "inputs.npy"), np.load(bundle / "golden" / "outputs.npy")
    fast = OrtBackend(path, exact_int8=False).run(x)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    exact = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]

    def cosine(a):
        return (a * y).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(y, axis=1)

    assert cosine(fast).min() > 0.99 and cosine(fast).min() >= cosine(exact).min() - 2e-3


def test_output_embedding_carries_qdq_only_when_asked(bundle, calibration, tmp_path, cpu_int8):
    path, record = cpu_int8
    producers = {o: n for n in onnx.load(str(path)).graph.node for o in n.output}
    model = onnx.load(str(path))
    chain = producers[model.graph.output[0].name]
    assert not record["output_quantized"] and chain.op_type != "DequantizeLinear"
    asked = int8(
        bundle / "model.fp32.onnx", tmp_path / "q.onnx", calibration, target="onnxruntime", quantize_output=True
    )
    model = onnx.load(str(tmp_path / "q.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    assert asked["output_quantized"] and producers[model.graph.output[0].name].op_type == "DequantizeLinear"


def test_keep_float_takes_op_types_and_node_globs(bundle, calibration, tmp_path):
    record = int8(
        bundle / "model.fp32.onnx",
        tmp_path / "q.onnx",
        calibration,
        target="onnxruntime",
        keep_float=["Add", "/layer4/*"],
    )
    model = onnx.load(str(tmp_path / "q.onnx"))
    kept = set(record["float_nodes"])
    assert {n.name for n in model.graph.node if n.op_type == "Add"} <= kept
    inits = initializers(model)
    quantized = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    for node in model.graph.node:
        if node.name in kept and node.op_type in ("Conv", "Add"):  # float: float weights, output not requantized
            assert node.output[0] not in quantized, node.name
            if node.op_type == "Conv":
                assert inits[node.input[1]].data_type == TensorProto.FLOAT, node.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert sum(n.name in kept for n in convs) == sum(n.name.startswith("/layer4/") for n in convs) > 0
    assert any(n.input[1] not in inits for n in convs)  # the rest is still int8
    assert record["keep_float"] == ["Add", "/layer4/*"]
    with pytest.raises(ValueError, match="'HardSwish' matches no op type or node name"):
        int8(bundle / "model.fp32.onnx", tmp_path / "r.onnx", calibration, keep_float=["HardSwish"])


def test_small_calibration_set_warns(bundle, calibration, tmp_path):
    with pytest.warns(UserWarning, match="calibration on 8 images"):
        to_int8(bundle / "model.fp32.onnx", tmp_path / "int8.onnx", calibration[:8])
    assert (tmp_path / "int8.onnx").is_file()


def test_bad_calibration_or_target_is_refused(bundle, tmp_path):
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        to_int8(bundle / "model.fp32.onnx", tmp_path / "int8.onnx", np.zeros((4, 32, 32), np.float32))
    with pytest.raises(ValueError, match="unknown int8 target 'tflite'"):
        to_int8(bundle / "model.fp32.onnx", tmp_path / "int8.onnx", np.zeros((4, 3, 32, 32), np.float32), "tflite")
    assert not (tmp_path / "int8.onnx").exists()
