"""A teacher shipped in parts (fp16, each part sha256-checked) imports like a whole checkpoint."""

import json

import pytest
import torch

from kt_edge.errors import CheckpointError
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import SIDECAR, WEIGHTS, save_backbone
from kt_edge.models.heads import projection_head
from kt_edge.models.importers import import_teacher
from kt_edge.models.parts import write_parts


@pytest.fixture
def shipped(tmp_path):
    torch.manual_seed(0)
    model, head = build_backbone("alexnet", 32).eval(), projection_head(256, 64, 16).eval()
    save_backbone(model, tmp_path / "trained", head, method="moco", inputs="x")
    files = write_parts(
        tmp_path / "trained", tmp_path / "shipped", WEIGHTS, SIDECAR, max_bytes=600_000, gpu="a GPU", minutes=2.5
    )
    return model, head, tmp_path / "shipped", files


def test_parts_are_small_fp16_and_join_into_the_same_teacher(shipped):
    model, head, folder, files = shipped
    parts = [f for f in files if ".part-" in f.name]
    assert len(parts) > 2 and all(f.stat().st_size <= 600_000 for f in parts)
    card = json.loads((folder / SIDECAR).read_text())
    assert card["dtype"] == "float16" and card["gpu"] == "a GPU" and card["method"] == "moco"
    assert not (folder / WEIGHTS).exists()
    teacher, projection = import_teacher(folder, "alexnet", 32)
    assert (folder / WEIGHTS).is_file()  # joined on first use
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), model(x), rtol=1e-2, atol=1e-2)  # fp16 weights
        torch.testing.assert_close(projection(teacher(x)), head(model(x)), rtol=1e-2, atol=1e-2)


def test_a_changed_or_missing_part_is_refused_by_name(shipped):
    _, _, folder, files = shipped
    part = next(f for f in files if f.name.endswith(".part-1"))
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"part-1: sha256 differs"):
        import_teacher(folder, "alexnet", 32)
    part.unlink()
    with pytest.raises(CheckpointError, match=r"part-1: a part of model.safetensors is missing"):
        import_teacher(folder, "alexnet", 32)
    assert not (folder / WEIGHTS).exists()


def test_the_ship_script_checks_every_part_before_filling_the_slot(shipped, tmp_path):
    import sys

    from sample_kit import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    from ship_teacher import ship

    _, _, folder, files = shipped
    copied = ship(folder, tmp_path / "slot")
    assert sorted(f.name for f in copied) == sorted(f.name for f in files)
    assert not (tmp_path / "slot" / WEIGHTS).exists()  # joined again on import, never committed
    part = next(f for f in files if f.name.endswith(".part-0"))
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="part-0: sha256 differs"):
        ship(folder, tmp_path / "other")
    assert not (tmp_path / "other").exists()
