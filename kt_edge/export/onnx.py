"""PyTorch -> fp32 ONNX with a dynamic batch, simplified by onnxslim and checked before and after."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxslim
import torch

from kt_edge import atomic

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"


def export_fp32(model: torch.nn.Module, path: Path, image_size: int, opset: int = 17) -> None:
    """Opset 17 by default: the newest TensorRT 8.5 (JetPack 5) parses. Only the batch is dynamic."""
    model = model.eval().cpu()
    example = torch.zeros(2, 3, image_size, image_size)
    with atomic.atomic_path(path) as tmp:
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
        onnx.checker.check_model(str(tmp))
        slim = onnxslim.slim(str(tmp))
        onnx.checker.check_model(slim)
        onnx.save(slim, str(tmp))
