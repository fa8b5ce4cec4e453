"""``keep_float: auto``: the structural selectors it climbs through, and a choice made by measurement."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from sample_kit import student_with_statistics

from kt_edge.export.int8_choice import choose_int8, rungs
from kt_edge.export.onnx import export_fp32
from kt_edge.export.quantize import float_nodes, selected


def _exported(arch: str, path):
    model = student_with_statistics(arch)
    export_fp32(model, path, 32)
    return model, onnx.load(str(path))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "model.fp32.onnx"
    model, graph = _exported("mobilenet_v3_small", path)
    return model, graph, path


def test_depthwise_selects_exactly_the_depthwise_convs(small):
    model, graph, _ = small
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    names = selected(graph, "depthwise")
    assert len(names) == len(depthwise) > 0
    groups = {
        n.name: next((a.i for a in n.attribute if a.name == "group"), 1)
        for n in graph.graph.node
        if n.op_type == "Conv"
    }
    assert all(groups[name] > 1 for name in names)


def test_stem_is_the_conv_reading_the_image(small, tmp_path):
    _, graph, _ = small
    (stem,) = selected(graph, "stem")
    node = next(n for n in graph.graph.node if n.name == stem)
    assert node.op_type == "Conv" and node.input[0] == graph.graph.input[0].name
    _, resnet = _exported("resnet18", tmp_path / "resnet.onnx")
    assert selected(resnet, "depthwise") == []
    with pytest.raises(ValueError, match="'depthwise' matches no op type"):
        float_nodes(resnet, ["depthwise"])  # asked for by name, selecting nothing is an error


def test_the_ladder_skips_rungs_that_change_nothing(small, tmp_path):
    _exported("resnet18", tmp_path / "resnet.onnx")
    assert rungs(tmp_path / "resnet.onnx") == [(), ("stem",)]
    assert rungs(small[2]) == [(), ("stem",), ("stem", "depthwise")]


@pytest.mark.parametrize("min_cosine, tried", [(-1.0, 1), (1.0, 3)])
def test_the_first_rung_that_keeps_the_threshold_wins_else_the_best(small, tmp_path, min_cosine, tried):
    model, _, path = small
    rng = np.random.default_rng(0)
    calibration, images = (rng.standard_normal((n, 3, 32, 32), dtype=np.float32) for n in (64, 48))
    with torch.no_grad():
        reference = model(torch.from_numpy(images)).numpy()
    dst = tmp_path / "model.int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 calibration images: the small-set warning is expected here
        record = choose_int8(path, dst, calibration, images, reference, min_cosine)
    tries = record["choice"]["tries"]
    assert len(tries) == tried and record["choice"]["images"] == 48
    best = max(tries, key=lambda t: t["min_cosine"])
    assert record["keep_float"] == best["keep_float"]
    kept = set(float_nodes(onnx.load(str(path)), best["keep_float"]))
    assert set(record["float_nodes"]) == kept
    int8 = onnx.load(str(dst))
    float_convs = {n.name: n.input[1] for n in int8.graph.node if n.op_type == "Conv" and n.name in kept}
    assert set(float_convs) == kept  # every kept node is a conv of the int8 file, reading float weights
    assert set(float_convs.values()) <= {t.name for t in int8.graph.initializer}
