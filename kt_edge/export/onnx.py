"""PyTorch -> fp32 ONNX with a dynamic batch, simplified by onnxslim and checked before and after.

The graph keeps to the ops TensorRT 8.5 (JetPack 5) parses: its ONNX parser has no HardSwish
(onnx-tensorrt docs/operators.md at the 8.5 GA release; marked supported only from 8.6), so
MobileNetV3's hardswish is exported as the identity it is, ``x * HardSigmoid(x)``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import onnxslim
import torch
from torch import nn
from torch.nn import functional as F

from kt_edge import atomic

INPUT_NAME = "images"
OUTPUT_NAME = "embedding"


def export_fp32(model: torch.nn.Module, path: Path, image_size: int, opset: int = 17) -> None:
    """Opset 17 by default: the newest TensorRT 8.5 (JetPack 5) parses. Only the batch is dynamic."""
    model = _without_hardswish(model.eval().cpu())
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


class HardSwishAsHardSigmoid(nn.Module):
    """hardswish(x) = x * relu6(x + 3) / 6 = x * hardsigmoid(x): exported as Mul and HardSigmoid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(x)


def _without_hardswish(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.Hardswish`` replaced (the model itself is left as it is)."""
    if not any(isinstance(m, nn.Hardswish) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Hardswish):
                setattr(parent, name, HardSwishAsHardSigmoid())
    return model
