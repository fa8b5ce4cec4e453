"""Imported teachers: official MoCo / SwAV / DINO layouts and torchvision state dicts round-trip to the same
outputs; mismatches name their keys; pickles that hold more than weights are refused; no downloads."""

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sample_kit import SAMPLE

from kt_edge.errors import CheckpointError, RecipeError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import load_backbone, load_projection, save_backbone
from kt_edge.models.importers import backbone_state, detect_format, import_teacher, read_checkpoint
from kt_edge.recipe import recipe_from_dict

SIZE = 32


@pytest.fixture(scope="module")
def reference():
    """A resnet18 with non-trivial BatchNorm statistics, its torchvision-named weights and a probe batch."""
    torch.manual_seed(0)
    model = build_backbone("resnet18", SIZE)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, SIZE, SIZE))  # move the running statistics off their defaults
    model.eval()
    plain = {k.removeprefix("body."): v.clone() for k, v in model.state_dict().items()}
    return model, plain, torch.randn(4, 3, SIZE, SIZE)


def head_weights(prefix: str) -> dict:
    """A MoCo v2 MLP head in fc: what the official checkpoints carry and the import must drop."""
    return {
        f"{prefix}fc.0.weight": torch.randn(512, 512),
        f"{prefix}fc.0.bias": torch.randn(512),
        f"{prefix}fc.2.weight": torch.randn(128, 512),
        f"{prefix}fc.2.bias": torch.randn(128),
    }


def official(plain: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": v for k, v in plain.items()}


def layouts(plain: dict) -> dict:
    """Each format as its official release lays it out."""
    moco_v2 = {
        **official(plain, "module.encoder_q."),
        **head_weights("module.encoder_q."),
        **official(plain, "module.encoder_k."),
        **head_weights("module.encoder_k."),
        "module.queue": torch.randn(128, 64),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    moco_v3 = {
        **official(plain, "module.base_encoder."),
        **head_weights("module.base_encoder."),
        **official(plain, "module.momentum_encoder."),
        "module.predictor.0.weight": torch.randn(512, 128),
    }
    swav = {
        **official(plain, "module."),
        "module.projection_head.0.weight": torch.randn(256, 512),
        "module.projection_head.0.bias": torch.randn(256),
        "module.prototypes.weight": torch.randn(300, 128),
    }
    dino_teacher = {
        **official(plain, "module.backbone."),
        "module.head.mlp.0.weight": torch.randn(64, 512),
        "module.head.last_layer.weight_g": torch.randn(100, 1),
    }
    return {
        "moco": {
            "epoch": 200,
            "arch": "resnet18",
            "state_dict": moco_v2,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]},
        },
        "moco_v3": {"epoch": 100, "arch": "resnet18", "state_dict": moco_v3, "scaler": {"scale": 65536.0}},
        "swav": swav,
        "dino": {
            "student": dino_teacher,
            "teacher": dino_teacher,
            "epoch": 100,
            "args": argparse.Namespace(arch="resnet18", out_dim=100),
        },
        "torchvision": {**plain, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)},
        "torchvision_ddp": official(
            {**plain, "fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)}, "module."
        ),
    }


@pytest.mark.parametrize(
    "layout, fmt",
    [
        ("moco", "moco"),
        ("moco_v3", "moco"),
        ("swav", "swav"),
        ("dino", "dino"),
        ("torchvision", "torchvision"),
        ("torchvision_ddp", "torchvision"),
    ],
)
def test_official_layouts_round_trip_to_the_same_outputs(tmp_path, reference, layout, fmt):
    model, plain, probe = reference
    path = tmp_path / f"{layout}.pth"
    torch.save(layouts_seeded(plain)[layout], path)
    checkpoint = read_checkpoint(path)
    assert detect_format(checkpoint) == fmt
    state = backbone_state(checkpoint, fmt, source=str(path))
    assert state.keys() == model.state_dict().keys()  # heads, key encoders, queues and prototypes dropped
    teacher, projection = import_teacher(path, "resnet18", SIZE, format="auto")
    assert not teacher.training
    with torch.no_grad():
        assert torch.equal(teacher(probe), model(probe))
        features = model(probe)
        expected = official_head_output(layouts_seeded(plain)[layout], features)
        if expected is None:
            assert projection is None  # a supervised classifier is not a projection head
        else:
            assert not projection.training
            torch.testing.assert_close(projection(features), expected, rtol=1e-4, atol=1e-3)


def layouts_seeded(plain: dict) -> dict:
    torch.manual_seed(5)
    return layouts(plain)


def official_head_output(layout: dict, x: torch.Tensor) -> torch.Tensor | None:
    """The projection head of each official layout, applied by hand: MoCo's Linear-ReLU-Linear, SwAV's and
    DINO's first layer (all the fixtures hold), nothing for torchvision."""
    state = layout.get("state_dict", layout)
    if "teacher" in layout:
        return x @ layout["teacher"]["module.head.mlp.0.weight"].T
    for prefix in ("module.encoder_q.", "module.base_encoder."):
        if f"{prefix}fc.0.weight" in state:
            hidden = torch.relu(x @ state[f"{prefix}fc.0.weight"].T + state[f"{prefix}fc.0.bias"])
            return hidden @ state[f"{prefix}fc.2.weight"].T + state[f"{prefix}fc.2.bias"]
    if "module.projection_head.0.weight" in state:
        return x @ state["module.projection_head.0.weight"].T + state["module.projection_head.0.bias"]
    return None


def test_our_own_checkpoints_import_as_files_and_folders(tmp_path, reference):
    model, _, probe = reference
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "weights.safetensors"))
    save_backbone(model, tmp_path / "folder")
    with torch.no_grad():
        for path in (tmp_path / "weights.safetensors", tmp_path / "folder"):
            assert torch.equal(import_teacher(path, "resnet18", SIZE)[0](probe), model(probe))


def test_a_layer_keeps_the_weights_below_it(tmp_path, reference):
    model, plain, probe = reference
    torch.save(layouts(plain)["moco"], tmp_path / "moco.pth")
    teacher, projection = import_teacher(tmp_path / "moco.pth", "resnet18", SIZE, layer="layer3")
    assert teacher.embed_dim == 256 and projection is None  # the head fits the last layer only
    net = model.body
    with torch.no_grad():
        x = net.layer3(net.layer2(net.layer1(net.relu(net.bn1(net.conv1(probe))))))
        assert torch.allclose(teacher(probe), x.mean(dim=(2, 3)), atol=1e-6)


def test_a_wrong_architecture_lists_missing_unexpected_and_misshapen_keys(tmp_path, reference):
    _, plain, _ = reference
    torch.save(layouts(plain)["swav"], tmp_path / "swav.pth")
    with pytest.raises(
        CheckpointError,
        match=r"swav.pth \(format swav\) does not fit Backbone: shapes differ "
        r"\(checkpoint vs model\) for \[body.layer1.0.conv1.weight "
        r"\[64, 64, 3, 3\] vs \[64, 64, 1, 1\]",
    ):
        import_teacher(tmp_path / "swav.pth", "resnet50", SIZE)
    extra = {**plain, "layer5.0.conv1.weight": torch.randn(1)}
    del extra["layer4.1.bn2.running_var"]
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(
        CheckpointError,
        match=r"missing \[body.layer4.1.bn2.running_var\]; "
        r"unexpected \[body.layer5.0.conv1.weight\]",
    ):
        import_teacher(tmp_path / "extra.pth", "resnet18", SIZE)


def test_a_format_that_does_not_fit_the_file_says_so(tmp_path, reference):
    _, plain, _ = reference
    torch.save(plain, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="no MoCo query encoder"):
        import_teacher(tmp_path / "plain.pth", "resnet18", SIZE, format="moco")
    with pytest.raises(CheckpointError, match="timm teacher is a folder"):
        import_teacher(tmp_path / "plain.pth", "resnet18", SIZE, format="timm")
    with pytest.raises(CheckpointError, match="not found"):
        import_teacher(tmp_path / "absent.pth", "resnet18", SIZE)


class Payload:
    """Unpickling this would create a file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused, the pickle holds more than weights"):
        import_teacher(tmp_path / "evil.pth", "resnet18", SIZE)
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        import_teacher(tmp_path / "junk.pth", "resnet18", SIZE)


def test_the_recipe_checks_the_format_key():
    base = {"name": "x", "data": {"train": {"path": str(SAMPLE / "train")}}}
    ok = recipe_from_dict({**base, "teacher": {"checkpoint": "moco.pth", "format": "moco"}})
    assert ok.teacher.format == "moco"
    assert recipe_from_dict(base).teacher.format == "auto"
    with pytest.raises(RecipeError, match="teacher.format"):
        recipe_from_dict({**base, "teacher": {"checkpoint": "x.pth", "format": "caffe"}})
    with pytest.raises(RecipeError, match="teacher.format 'dino' describes teacher.checkpoint, which is not set"):
        recipe_from_dict({**base, "teacher": {"format": "dino"}})


def test_a_timm_model_in_hub_layout_imports_and_reloads(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is optional and not installed")
    from safetensors.torch import save_file as save

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_tiny_patch16_224",
                "num_classes": 10,
                "num_features": 192,
                "pretrained_cfg": {
                    "input_size": [3, 224, 224],
                    "mean": [0.5, 0.5, 0.5],
                    "std": [0.5, 0.5, 0.5],
                    "classifier": "head",
                },
            }
        )
    )
    save({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    teacher, projection = import_teacher(folder, "resnet18", SIZE)
    assert teacher.embed_dim == 192 and projection is None
    ours = torch.randn(2, 3, SIZE, SIZE)
    pixels = ours * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
        1, 3, 1, 1
    )
    theirs = torch.nn.functional.interpolate((pixels - 0.5) / 0.5, size=(224, 224), mode="bicubic", align_corners=False)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(theirs), pre_logits=True)
        assert torch.allclose(teacher(ours), expected, atol=1e-4)
        save_backbone(teacher, tmp_path / "saved")
        reloaded, card = load_backbone(tmp_path / "saved")
        assert card["arch"] == "timm/vit_tiny_patch16_224"
        assert torch.allclose(reloaded(ours), teacher(ours), atol=1e-5)


def test_the_teacher_stage_imports_an_official_checkpoint_for_distillation(tmp_path, reference, tiny_recipe):
    from kt_edge.recipe import load_recipe
    from kt_edge.stages.run import teacher as train_teacher

    model, plain, probe = reference
    torch.save(layouts(plain)["moco"], tmp_path / "moco_v2.pth.tar")
    recipe = load_recipe(
        tiny_recipe(teacher={"arch": "resnet18", "checkpoint": str(tmp_path / "moco_v2.pth.tar"), "format": "moco"})
    )
    folder = train_teacher(recipe)
    teacher, card = load_backbone(folder)
    assert card["method"] == "imported" and card["arch"] == "resnet18"
    head = load_projection(folder)
    with torch.no_grad():
        assert torch.equal(teacher(probe), model(probe))
        _, imported = import_teacher(tmp_path / "moco_v2.pth.tar", "resnet18", SIZE)
        assert torch.equal(head(teacher(probe)), imported(model(probe)))  # the MoCo head travels with it
