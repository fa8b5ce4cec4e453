"""benchmarks/quality.py on a micro grid: shared teacher, distilled and alone students, the floor, int8 k-NN."""

import importlib.util
import json

import pytest
import yaml
from sample_kit import REPO, tiny_recipe_dict

from kt_edge.recipe import load_recipe

spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    data = tiny_recipe_dict(
        root / "unused",
        teacher={"arch": "alexnet"},
        eval={"protocols": ["knn"], "knn": [{"k": 20, "t": 0.1}, {"k": 1, "t": 0.1}]},
        export={"calibration": 16},
    )
    data["data"].update(
        image_size=16, train={**data["data"]["train"], "subset": 96}, test={**data["data"]["test"], "subset": 40}
    )
    for section in ("teacher", "distill"):
        data[section]["train"]["max_steps"] = 2
    (root / "tiny.yaml").write_text(yaml.safe_dump(data))
    args = [
        str(root / "tiny.yaml"),
        "--students",
        "alexnet",
        "--methods",
        "seed,alone",
        "--runs-dir",
        str(root / "runs"),
        "--out",
        str(root / "grid.json"),
    ]
    quality.main(args)
    return root, args


def test_the_grid_scores_teacher_floor_distilled_and_alone_students(grid):
    root, _ = grid
    report = json.loads((root / "grid.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["teacher alexnet moco", "alexnet random-init", "alexnet seed", "alexnet moco-alone"]
    assert [rows[m]["role"] for m in rows] == ["teacher", "random-init", "student", "alone"]
    assert rows["alexnet seed"]["images_seen"] == rows["alexnet moco-alone"]["images_seen"] == 2 * 32
    for model, cell in (("alexnet seed", "alexnet-seed"), ("alexnet moco-alone", "alexnet-alone")):
        assert set(rows[model]["metrics"]) == {"knn_k20_t0.1", "knn_k1_t0.1"}
        bundle = root / "runs" / "tiny" / cell / "bundle" / "manifest.json"
        measured = json.loads(bundle.read_text())["parity"]["results"]["int8"]["accuracy"]
        assert rows[model]["export"]["int8"] == measured  # the grid reports what the bundle measured
    table = (root / "grid.md").read_text()
    assert "| tiny | alexnet seed | 64 |" in table and "vs alone" in table


def test_a_rerun_reuses_every_finished_cell(grid):
    root, args = grid
    rows_path = root / "runs" / "tiny" / "alexnet-seed" / "quality.json"
    before = rows_path.stat().st_mtime_ns
    quality.main(args)
    assert rows_path.stat().st_mtime_ns == before


def test_unknown_methods_are_refused_by_name(grid, capsys):
    root, args = grid
    with pytest.raises(SystemExit):
        quality.main([args[0], "--methods", "seed,distill-harder"])
    assert "distill-harder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["cifar10", "imagenette", "cifar10-cpu", "imagenette-cpu"])
def test_every_cell_of_the_shipped_grids_is_a_valid_recipe(name, tmp_path):
    base = load_recipe(REPO / "recipes" / f"{name}.yaml")
    images = base.data.train.subset or {"cifar10": 50_000, "imagenette": 9_469}[name]
    for student in quality.STUDENTS:
        for method in quality.METHODS:
            teacher = None if method == "alone" else tmp_path / "teacher"
            recipe = quality.student_recipe(base, student, method, teacher, tmp_path, floor=False)
            assert recipe.distill.student == student and "int8" in recipe.export.precisions
            assert recipe.distill.train == base.distill.train  # the same budget in every cell
            size = recipe.distill.options.get("queue", recipe.distill.options.get("bank"))
            assert size is None or size < images  # a queue or bank smaller than the dataset
