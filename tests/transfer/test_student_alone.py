"""The self-supervised baseline: `distill.method` naming a teacher method trains the student alone."""

import pytest
from sample_kit import tiny_recipe_dict

from kt_edge.engine.method import Needs
from kt_edge.errors import RecipeError
from kt_edge.models.checkpoint import read_sidecar
from kt_edge.recipe import recipe_from_dict
from kt_edge.stages.inputs import distill_needs, student_inputs
from kt_edge.stages.run import student as distill

ALONE = {"method": "moco", "options": {"queue": 64, "hidden": 64, "dim": 32, "momentum": 0.99}}


def test_a_student_trains_alone_without_any_teacher(tmp_path):
    recipe = recipe_from_dict(tiny_recipe_dict(tmp_path, distill=ALONE))
    assert distill_needs(recipe) is Needs.NOTHING
    card = read_sidecar(distill(recipe))
    assert (card["arch"], card["method"], card["teacher"], card["steps"]) == ("alexnet", "moco", None, 3)
    assert not (recipe.run_dir / "teacher").exists()


def test_the_baseline_ignores_the_teacher_section_but_distillation_does_not(tmp_path):
    def inputs(**distill_section):
        return [
            student_inputs(
                recipe_from_dict(tiny_recipe_dict(tmp_path, distill=distill_section, teacher={"arch": arch}))
            )
            for arch in ("resnet18", "alexnet")
        ]

    alone = inputs(**ALONE)
    assert alone[0] == alone[1]
    seed = inputs(method="seed")
    assert seed[0] != seed[1]


def test_the_baseline_options_are_the_teacher_methods_own(tmp_path):
    with pytest.raises(RecipeError, match="distill.options"):
        recipe_from_dict(tiny_recipe_dict(tmp_path, distill={"method": "moco", "options": {"tau_t": 0.1}}))
