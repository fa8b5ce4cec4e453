"""Backend plumbing: provider selection, name checks, and batching within an engine's limits."""

from __future__ import annotations

import numpy as np
import pytest
from kt_edge_runtime.backends import BackendError, run_batched
from kt_edge_runtime.backends.onnxruntime import OrtBackend, resolve_providers


class RecordingBackend:
    """Doubles its input's per-sample mean; records the batch sizes it was given."""

    def __init__(self, min_batch: int, max_batch: int | None) -> None:
        self.min_batch, self.max_batch, self.seen = min_batch, max_batch, []

    def run(self, batch: np.ndarray) -> np.ndarray:
        assert self.min_batch <= len(batch) <= (self.max_batch or len(batch))
        self.seen.append(len(batch))
        return 2 * batch.reshape(len(batch), -1).mean(1, keepdims=True)


@pytest.mark.parametrize(("n", "lo", "hi", "sizes"), [(10, 1, 4, [4, 4, 2]), (10, 4, 4, [4, 4, 4]), (3, 1, None, [3])])
def test_run_batched_respects_engine_limits_and_order(n, lo, hi, sizes):
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 3, 2, 2), np.float32)
    backend = RecordingBackend(lo, hi)
    out = run_batched(backend, x, batch_size=32)
    assert backend.seen == sizes
    np.testing.assert_array_equal(out[:, 0], 2 * np.arange(n))  # padding dropped, order kept


def test_providers():
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="NopeExecutionProvider is not available"):
        resolve_providers(["NopeExecutionProvider"])


def test_wrong_graph_names_are_refused(bundle):
    with pytest.raises(BackendError, match="no input named 'pixels'"):
        OrtBackend(bundle / "model.fp32.onnx", input_name="pixels")
    with pytest.raises(BackendError, match="cannot load"):
        OrtBackend(bundle / "golden" / "inputs.npy")


def saturating_conv(path, weight: int) -> None:
    """uint8 input (scale 1) -> 1x1 Conv over 2 channels with int8 weights `weight` -> uint8 output (scale 256):
    the two products of a pair sum to 2 * 255 * weight, past int16 for weights over 64."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(np.full((1, 2, 1, 1), weight, np.int8), "w"),
        numpy_helper.from_array(np.array([1.0], np.float32), "w_scale"),
        numpy_helper.from_array(np.array([0], np.int8), "w_zero"),
        numpy_helper.from_array(np.array(256.0, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xf"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wf"], axis=0),
        helper.make_node("Conv", ["xf", "wf"], ["c"]),
        helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 1, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    import onnx

    onnx.save(model, str(path))


def test_int8_weights_within_64_run_exactly_on_the_fused_kernels(tmp_path):
    """The reason for 7-bit weights (int8 target onnxruntime) and for exact_int8 with full-range weights."""
    x = np.full((1, 2, 1, 1), 255.0, np.float32)
    for weight in (64, 127):
        saturating_conv(tmp_path / f"w{weight}.onnx", weight)
        exact = OrtBackend(tmp_path / f"w{weight}.onnx", exact_int8=True)
        assert "QLinearConv" in exact.kernels(x)["ops"]
        assert exact.run(x).item() == pytest.approx(256 * round(2 * 255 * weight / 256))
    fast = OrtBackend(tmp_path / "w64.onnx", exact_int8=False).run(x).item()
    assert fast == pytest.approx(256 * round(2 * 255 * 64 / 256))
    saturating = OrtBackend(tmp_path / "w127.onnx", exact_int8=False)
    if "u8s8 without VNNI" in saturating.kernels(x)["int8"]:  # x86 without VNNI: the 16-bit pair sum clamps
        assert saturating.run(x).item() == pytest.approx(256 * round(32767 / 256))
