"""SEED distils the teacher's projection-head output by default, as the official code; backbone on request."""

import logging

import pytest
import torch
from sample_kit import tiny_recipe_dict

from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import load_projection, read_sidecar
from kt_edge.models.frozen import FrozenTeacher
from kt_edge.recipe import recipe_from_dict
from kt_edge.stages.run import student as distill
from kt_edge.stages.run import teacher as train_teacher


def test_a_frozen_teacher_with_its_head_returns_the_heads_output():
    backbone, head = build_backbone("alexnet", 32).eval(), torch.nn.Sequential(torch.nn.Linear(256, 12)).eval()
    teacher = FrozenTeacher(backbone, torch.device("cpu"), head)
    x = torch.randn(2, 3, 32, 32)
    assert teacher.space == "head" and teacher.embed_dim == 12
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), head(backbone(x)))
    plain = FrozenTeacher(backbone, torch.device("cpu"))
    assert plain.space == "backbone" and plain.embed_dim == 256


FAST = {"train": {"epochs": 1, "max_steps": 1, "batch_size": 32, "lr": 0.05}}


@pytest.mark.parametrize("space, dim", [("head", 32), ("backbone", 256)])
def test_seed_learns_the_space_the_recipe_names(tmp_path, space, dim, one_thread):
    """A MoCo teacher (an AlexNet, head 256 -> 32): its head is saved with it, and SEED's student head maps to the
    space distilled, which the student's sidecar records."""
    recipe = recipe_from_dict(
        tiny_recipe_dict(
            tmp_path,
            teacher={"arch": "alexnet", **FAST},
            distill={**FAST, "options": {"queue": 64, "hidden": 64, "teacher_space": space}},
        )
    )
    head = load_projection(train_teacher(recipe))
    assert head is not None and head[-1].out_features == 32
    card = read_sidecar(distill(recipe))
    assert (card["teacher_space"], card["teacher_dim"]) == (space, dim)


def test_a_teacher_without_a_head_is_distilled_in_its_backbone_space_with_a_warning(tmp_path, caplog, one_thread):
    recipe = recipe_from_dict(
        tiny_recipe_dict(
            tmp_path, teacher={"arch": "alexnet", "method": "rotation", "options": {}, **FAST}, distill=FAST
        )
    )
    assert recipe.distill.options["teacher_space"] == "head"  # the default
    train_teacher(recipe)
    with caplog.at_level(logging.WARNING):
        card = read_sidecar(distill(recipe))
    assert card["teacher_space"] == "backbone" and "has no projection head" in caplog.text
