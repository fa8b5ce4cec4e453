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
