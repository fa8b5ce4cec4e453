import pytest
from sample_kit import REPO, tiny_recipe_dict
from typer.testing import CliRunner

from kt_edge.cli import app
from kt_edge.errors import RecipeError
from kt_edge.recipe import load_recipe, recipe_from_dict


def test_quickstart_recipe_is_valid():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert recipe.teacher.method == "moco" and recipe.distill.method == "seed"
    # method options are validated and completed with the method's defaults
    assert recipe.distill.options["tau_teacher"] == pytest.approx(1e-4)


def test_the_gpu_teacher_quick_start_imports_the_shipped_slot():
    recipe = load_recipe(REPO / "recipes" / "quickstart-gpu-teacher.yaml")
    assert str(recipe.teacher.checkpoint) == "models/cifar10-teacher" and recipe.teacher.format == "kt-edge"
    assert recipe.distill.options["teacher_space"] == "head"


def test_override_any_field(tmp_path):
    recipe = recipe_from_dict(
        tiny_recipe_dict(tmp_path),
        ["distill.train.epochs=7", "distill.options.tau_student=0.1", "data.train.subset=100"],
    )
    assert recipe.distill.train.epochs == 7
    assert recipe.distill.options["tau_student"] == 0.1
    assert recipe.data.train.subset == 100


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.optons.queue=5", "unknown key 'teacher.optons'"),
        ("teacher.options.qeue=5", "unknown key 'teacher.options.qeue'"),
        ("teacher.method=nope", "unknown teacher.method 'nope'"),
        ("data.image_size=big", "data.image_size"),
        ("distill.train.lr=-1", "distill.train.lr"),
        ("distill.student=vgg", "distill.student"),
        ("noequals", "expected KEY=VALUE"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(tiny_recipe_dict(tmp_path), [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_refuses_bad_recipe_before_compute_with_exit_2(tiny_recipe):
    path = tiny_recipe()
    result = CliRunner().invoke(app, ["run", str(path), "--set", "teacher.options.qeue=3"])
    assert result.exit_code == 2
    assert "unknown key 'teacher.options.qeue'" in result.output
    assert not (path.parent / "runs").exists()  # nothing was started


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_digest_tracks_only_named_inputs(tmp_path):
    a = recipe_from_dict(tiny_recipe_dict(tmp_path))
    b = recipe_from_dict(tiny_recipe_dict(tmp_path), ["distill.train.lr=0.5"])
    assert a.digest("teacher") == b.digest("teacher")
    assert a.digest("distill") != b.digest("distill")


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.options.queue=48", "distill.options.queue 48 must be a multiple of distill.train.batch_size 32"),
        ("distill.options.queue=16", "distill.options.queue 16 must be a multiple of distill.train.batch_size 32"),
        ("teacher.options.queue=100", "teacher.options.queue 100 must be a multiple of teacher.train.batch_size 32"),
        ("distill.method=compress", "distill.options.bank 64 must be a multiple of distill.train.batch_size 48"),
    ],
)
def test_queues_and_banks_are_whole_global_batches_before_any_compute(tmp_path, override, message):
    """The official MoCo and SEED code asserts K % batch == 0: no batch may wrap around the queue's end."""
    extra = ["distill.train.batch_size=48", "distill.options={bank: 64}"] if "compress" in override else []
    with pytest.raises(RecipeError, match=message.replace(".", r"\.")):
        recipe_from_dict(tiny_recipe_dict(tmp_path), [override, *extra])
    recipe_from_dict(tiny_recipe_dict(tmp_path), ["distill.options.queue=96"])  # three batches: fine


def test_a_queue_over_a_quarter_of_the_dataset_is_warned_about(caplog):
    import logging

    from kt_edge.engine.queue import check_queue_size

    with caplog.at_level(logging.WARNING):
        check_queue_size("distill.options.queue", 256, 1024)
        assert not caplog.records
        check_queue_size("distill.options.queue", 512, 1024)
    assert "over a quarter of the 1024 training images" in caplog.text
