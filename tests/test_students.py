"""The Jetson-class students: torchvision's networks with a small-image variant, saved and exported like the rest."""

from __future__ import annotations

import typing
import warnings

import numpy as np
import onnx
import pytest
import torch
from kt_edge_runtime.backends.onnxruntime import OrtBackend
from sample_kit import student_with_statistics

from kt_edge.export.onnx import export_fp32
from kt_edge.export.quantize import to_fp16, to_int8
from kt_edge.models.backbones import BATCHNORM_MOMENTUM, MOBILE, STUDENTS, build_backbone
from kt_edge.models.checkpoint import load_backbone, save_backbone
from kt_edge.recipe import DistillConfig

# Ops marked supported in both TensorRT 8.5 GA's and TensorRT 10's ONNX parser matrices
# (onnx/onnx-tensorrt docs/operators.md): the ops these graphs may use. HardSwish is not among them:
# the 8.5 parser has none (it came in 8.6), so MobileNetV3's is exported as x * HardSigmoid(x).
TENSORRT_85_OPS = {
    "Add", "AveragePool", "Cast", "Clip", "Concat", "Constant", "Conv", "DequantizeLinear", "Div", "Flatten",
    "Gemm", "GlobalAveragePool", "HardSigmoid", "Identity", "MatMul", "MaxPool", "Mul", "QuantizeLinear",
    "Relu", "Reshape", "Sigmoid",
}  # fmt: skip
WIDTHS = {"mobilenet_v3_large": 960, "mobilenet_v3_small": 576, "efficientnet_b0": 1280}


def test_the_recipe_offers_every_student():
    assert typing.get_args(DistillConfig.model_fields["student"].annotation) == STUDENTS


@pytest.mark.parametrize("arch", MOBILE)
@pytest.mark.parametrize("size, final_map", [(32, 4), (224, 7)])
def test_the_embedding_is_the_pooled_last_conv_at_stride_8_or_32(arch, size, final_map):
    """32 px runs at stride 8 (as the CIFAR ResNet does), 224 px at torchvision's stride 32."""
    backbone = build_backbone(arch, size).eval()
    features = backbone.body[0]
    with torch.no_grad():
        fmap = features(torch.zeros(1, 3, size, size))
        out = backbone(torch.zeros(2, 3, size, size))
    assert fmap.shape[-2:] == (final_map, final_map)
    assert out.shape == (2, WIDTHS[arch]) == (2, backbone.embed_dim)


@pytest.mark.parametrize("arch", MOBILE)
def test_batchnorm_follows_short_runs(arch):
    momenta = {m.momentum for m in build_backbone(arch, 32).modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {BATCHNORM_MOMENTUM}


def test_a_mobile_student_has_no_lower_stage_to_pick():
    with pytest.raises(ValueError, match="choose from none"):
        build_backbone("mobilenet_v3_small", 32, layer="layer3")


@pytest.mark.parametrize("arch", MOBILE)
def test_a_saved_student_loads_as_the_same_network(arch, tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone(arch, 32).eval()
    save_backbone(backbone, tmp_path, inputs="test")
    loaded, card = load_backbone(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), loaded.eval()(x))
    assert card["arch"] == arch and card["embed_dim"] == WIDTHS[arch]


@pytest.mark.parametrize("arch", MOBILE)
def test_every_precision_exports_to_ops_tensorrt_85_parses(arch, tmp_path):
    model = student_with_statistics(arch)
    modules = [type(m) for m in model.modules()]
    fp32, fp16, int8 = (tmp_path / f"model.{p}.onnx" for p in ("fp32", "fp16", "int8"))
    export_fp32(model, fp32, 32)
    to_fp16(fp32, fp16)
    calibration = np.random.default_rng(0).standard_normal((64, 3, 32, 32), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 calibration images: the small-set warning is expected here
        to_int8(fp32, int8, calibration, target="tensorrt")
    for path in (fp32, fp16, int8):
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert ops <= TENSORRT_85_OPS, f"{path.name}: {sorted(ops - TENSORRT_85_OPS)} not parsed by TensorRT 8.5"
    x = calibration[:8]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OrtBackend(fp32).run(x), expected, rtol=1e-4, atol=1e-5)
    assert [type(m) for m in model.modules()] == modules, "export swapped the hardswish of the model itself"
