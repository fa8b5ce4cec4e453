"""Backbones with the embedding taken at a named layer; the sidecar records it so load_backbone rebuilds it."""

import json

import pytest
import torch

from kt_edge.models.backbones import at_layer, build_backbone, layers_of
from kt_edge.models.checkpoint import SIDECAR, load_backbone, save_backbone


@pytest.mark.parametrize("arch, dims", [("alexnet", (64, 192, 384, 256, 256)), ("resnet18", (64, 128, 256, 512))])
def test_every_layer_embeds_with_its_width(arch, dims):
    for layer, dim in zip(layers_of(arch), dims):
        model = build_backbone(arch, 32, layer)
        assert model.embed_dim == dim
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    assert build_backbone(arch, 32, layers_of(arch)[-1]).layer is None  # the last stage is the default


def test_at_layer_is_the_pooled_output_of_that_stage():
    torch.manual_seed(0)
    full = build_backbone("alexnet", 32).eval()
    conv3 = at_layer(full, "conv3").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.body[0][:11](x).mean(dim=(2, 3))  # conv1..pool2, conv3, BN, ReLU
        assert torch.allclose(conv3(x), expected, atol=1e-6)
        assert torch.equal(at_layer(full, None)(x), full(x))


def test_the_sidecar_records_the_layer_and_load_rebuilds_it(tmp_path):
    torch.manual_seed(0)
    model = at_layer(build_backbone("resnet18", 32), "layer2").eval()
    save_backbone(model, tmp_path / "layer2")
    save_backbone(build_backbone("resnet18", 32), tmp_path / "default")
    assert json.loads((tmp_path / "layer2" / SIDECAR).read_text())["layer"] == "layer2"
    assert "layer" not in json.loads((tmp_path / "default" / SIDECAR).read_text())  # format unchanged
    loaded, _ = load_backbone(tmp_path / "layer2")
    assert loaded.layer == "layer2" and loaded.embed_dim == 128
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_an_unknown_layer_names_the_choices():
    with pytest.raises(ValueError, match="unknown layer 'conv9' for alexnet; choose from conv1, conv2"):
        build_backbone("alexnet", 32, "conv9")
