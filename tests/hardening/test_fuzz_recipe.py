"""Fuzzed recipe parsing: any mapping, YAML text or --set override yields a Recipe or one RecipeError."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sample_kit import tiny_recipe_dict

from kt_edge.errors import RecipeError
from kt_edge.recipe import Recipe, load_recipe, recipe_from_dict

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

BASE = tiny_recipe_dict("runs")
KEYS = [
    "name",
    "seed",
    "device",
    "runs_dir",
    "data",
    "data.train",
    "data.train.path",
    "data.train.subset",
    "data.train.format",
    "data.test",
    "data.image_size",
    "data.workers",
    "teacher",
    "teacher.arch",
    "teacher.method",
    "teacher.checkpoint",
    "teacher.options",
    "teacher.options.queue",
    "teacher.train",
    "teacher.train.batch_size",
    "teacher.train.lr",
    "teacher.train.max_steps",
    "distill.method",
    "distill.options",
    "distill.options.queue",
    "distill.student",
    "distill.train.epochs",
    "eval",
    "eval.knn",
    "eval.protocols",
    "eval.transfer",
    "export.precisions",
    "export.golden",
    "cluster",
    "cluster.k",
    "nonsense",
    "data.train.path.deeper",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["moco", "seed", "compress", "alexnet", "fp16", "knn", "cpu", "", "1e-4", "-1"])
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
    max_leaves=10,
)
override_text = st.text(max_size=40) | st.builds(
    lambda k, v: f"{k}={v}",
    st.sampled_from(KEYS),
    st.text(max_size=20)
    | st.sampled_from(["2001-13-01", "[" * 500, "{a: [", "!!binary x", "&a [*a]", "null", "1e999", "0x10", "~"]),
)


def _assert_recipe_or_recipe_error(call):
    try:
        recipe = call()
    except RecipeError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), str(exc)
        return
    assert isinstance(recipe, Recipe)
    recipe.to_yaml()  # `kt-edge check` prints it; every stage digests it
    recipe.digest()


def _set(data: dict, dotted: str, value) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4), st.lists(override_text, max_size=3))
@example([("teacher.options", {1: 2})], [])
@example([], ["seed=2001-13-01"])
@example([], ["teacher.options.queue=" + "[" * 500])
def test_mutated_recipe_and_overrides(changes, overrides):
    data = copy.deepcopy(BASE)
    for key, value in changes:
        _set(data, key, value)
    _assert_recipe_or_recipe_error(lambda: recipe_from_dict(data, overrides))


@FUZZ
@given(values, st.lists(override_text, max_size=3))
def test_arbitrary_data(data, overrides):
    _assert_recipe_or_recipe_error(lambda: recipe_from_dict(data, overrides))


@FUZZ
@given(
    st.text(max_size=200)
    | st.sampled_from(
        ["seed: 2001-13-01", "[" * 500, "a: &x [*x]", "- 1\n- 2", "!!python/object/apply:os.system ['true']"]
    )
)
def test_arbitrary_yaml_text(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    _assert_recipe_or_recipe_error(lambda: load_recipe(path))


@FUZZ
@given(st.binary(max_size=200))
@example(b"\xff\xfe\x00name: x")
def test_arbitrary_bytes(tmp_path, blob):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(blob)
    _assert_recipe_or_recipe_error(lambda: load_recipe(path))


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=3))
def test_valid_recipe_yaml_with_fuzzed_overrides(tmp_path, changes):
    """Overrides through the file path the CLI takes: `kt-edge ... -s key=value`."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in changes.items()]
    _assert_recipe_or_recipe_error(lambda: load_recipe(path, overrides))


def test_a_python_tag_in_yaml_runs_nothing(tmp_path):
    """safe_load only: a recipe cannot construct Python objects."""
    marker = tmp_path / "ran"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert "not valid YAML" in str(exc)
    assert not marker.exists()
