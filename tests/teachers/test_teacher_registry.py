"""Every registered teacher trains in the real trainer from a recipe, and hands on its encoder."""

import math

import pytest
import torch
from sample_kit import SAMPLE, sample_images
from test_method_conformance import TEACHER_OPTIONS as SMALL

from kt_edge.engine.trainer import train
from kt_edge.models.backbones import build_backbone
from kt_edge.recipe import recipe_from_dict
from kt_edge.teachers import TEACHERS, tiles


def test_every_method_has_valid_defaults():
    for method in TEACHERS.values():
        method.Options()  # `kt-edge methods` lists these defaults


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_method_takes_a_step_in_the_trainer(tmp_path, monkeypatch, name):
    monkeypatch.setenv(tiles.CACHE_ENV, str(tmp_path / "cache"))
    cfg = {"epochs": 1, "max_steps": 1, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3}
    recipe = recipe_from_dict(
        {
            "name": "t",
            "data": {"train": {"path": str(SAMPLE / "train")}},
            "teacher": {"arch": "alexnet", "method": name, "options": SMALL[name], "train": cfg},
        }
    )
    torch.manual_seed(0)
    method = TEACHERS[name](build_backbone("alexnet", 32), recipe.teacher.options, n_images=8)
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    result = train(
        method,
        sample_images(8),
        recipe.teacher.train,
        tmp_path / "out",
        stage="teacher",
        seed=0,
        device=torch.device("cpu"),
        image_size=32,
    )
    assert result.steps == 1 and math.isfinite(result.final_loss)  # the last step's loss is reported
    after = method.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the handed-on encoder learned
    assert (tmp_path / "out" / "resume.pt").is_file()
