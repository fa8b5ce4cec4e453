"""Side-by-side comparison of run directories, including runs whose later stages never ran."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from kt_edge_runtime.bench import BenchResult
from kt_edge_runtime.parity import accuracy_parity, golden_parity

from kt_edge.errors import DataError
from kt_edge.evaluate.compare import compare_runs, to_csv, to_markdown, write_csv, write_markdown


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if path.suffix == ".yaml" else json.dumps(data))


def _recipe(teacher=("resnet50", "moco"), distill="seed", student="resnet18") -> dict:
    return {
        "name": "r",
        "seed": 0,
        "data": {"train": {"path": "x"}},
        "teacher": {"arch": teacher[0], "method": teacher[1]},
        "distill": {"student": student, "method": distill},
    }


def _parity(precision: str, noise: float, candidate_top1: float) -> dict:
    """An export parity record as the bundle builder writes it, measured by the runtime's own checks."""
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(16, 8))
    golden = golden_parity(reference, reference + noise * rng.normal(size=reference.shape), precision)
    accuracy = accuracy_parity(80.0, candidate_top1)
    return {
        "golden": golden.to_dict(),
        "accuracy": {**accuracy.to_dict(), "k": 200, "t": 0.1, "split": "test"},
        "passed": golden.passed and accuracy.passed,
    }


def _bench(precision: str, p50_ms: dict[int, float]) -> dict:
    results = [BenchResult(b, 10, ms, ms * 1.1, ms * 1.2, b / ms * 1e3).to_dict() for b, ms in p50_ms.items()]
    return {
        "architecture": "resnet18",
        "backend": "tensorrt",
        "precision": precision,
        "model": "model.onnx",
        "device": "Orin",
        "providers": None,
        "results": results,
    }


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    full = tmp_path / "full"
    _write(full / "recipe.yaml", _recipe())
    _write(full / "teacher" / "model.json", {"arch": "resnet50", "method": "imported"})
    _write(full / "student" / "model.json", {"arch": "resnet18", "method": "seed"})
    _write(
        full / "eval" / "results.json",
        {
            "random_init": {"knn_k200_t0.1": 30.0},
            "student": {"knn_k200_t0.1": 80.0, "linear_top1": 82.5},
            "teacher": {"knn_k200_t0.1": 90.0, "linear_top1": 91.0, "cluster_nmi": 0.61234, "n_test": 500},
        },
    )
    _write(
        full / "bundle" / "manifest.json",
        {
            "verified": False,
            "parity": {"results": {"fp32": _parity("fp32", 0.0, 80.0), "int8": _parity("int8", 0.5, 76.0)}},
        },
    )
    _write(full / "bundle" / "bench-int8.json", _bench("int8", {1: 0.8, 8: 2.5}))

    teacher_only = tmp_path / "teacher-only"  # distillation never ran
    _write(teacher_only / "recipe.yaml", _recipe(teacher=("resnet18", "moco"), distill="compress", student="alexnet"))
    _write(teacher_only / "teacher" / "model.json", {"arch": "resnet18", "method": "moco"})
    _write(teacher_only / "eval" / "results.json", {"teacher": {"knn_k200_t0.1": 70.0, "knn_k20_t0.07": 71.0}})

    bare = tmp_path / "bare"  # nothing but an empty folder
    bare.mkdir()
    return [full, teacher_only, bare]


def test_rows_side_by_side_with_blanks_for_missing_stages(runs):
    rows = compare_runs(runs)
    assert [r["run"] for r in rows] == ["full", "teacher-only", "bare"]
    full, teacher_only, bare = rows
    # the checkpoints say what ran (an imported teacher), the recipe fills in stages that never ran
    assert (full["teacher"], full["distill"], full["student"]) == ("resnet50 imported", "seed", "resnet18")
    assert (teacher_only["teacher"], teacher_only["distill"], teacher_only["student"]) == (
        "resnet18 moco",
        "compress",
        "alexnet",
    )
    assert bare == {"run": "bare", "teacher": "", "distill": "", "student": ""}
    assert full["student/linear_top1"] == 82.5 and full["teacher/n_test"] == 500.0
    assert full["parity_fp32"] == "PASS" and full["parity_int8"] == "FAIL"  # int8 lost 4 points of top-1
    assert full["parity_int8_top1_drop"] == pytest.approx(4.0) and full["parity_fp32_min_cosine"] == pytest.approx(1.0)
    assert full["latency_int8_tensorrt_b8_p50_ms"] == 2.5 and full["bench_device"] == "Orin"
    assert "student/knn_k200_t0.1" not in teacher_only and teacher_only["teacher/knn_k20_t0.07"] == 71.0


def test_csv_and_markdown_share_one_column_order(runs, tmp_path):
    rows = compare_runs(runs)
    table = list(csv.reader(io.StringIO(to_csv(rows))))
    header = table[0]
    assert header[:4] == ["run", "teacher", "distill", "student"]
    # models in the usual order, then every key in order of first appearance
    assert header[4:7] == ["teacher/knn_k200_t0.1", "teacher/linear_top1", "teacher/cluster_nmi"]
    assert header.index("student/knn_k200_t0.1") < header.index("random_init/knn_k200_t0.1")
    assert header[-1] == "teacher/knn_k20_t0.07"  # only the second run has it
    assert len(table) == 4 and all(len(line) == len(header) for line in table)
    bare = dict(zip(header, table[3]))
    assert bare["run"] == "bare" and set(bare.values()) == {"bare", ""}
    assert dict(zip(header, table[1]))["teacher/cluster_nmi"] == "0.61234"  # CSV keeps full precision

    md = to_markdown(rows).splitlines()
    assert md[0] == "| " + " | ".join(header) + " |" and md[1].count("---") == len(header) and len(md) == 5
    full = dict(zip(header, (cell.strip() for cell in md[2].strip("|").split("|"))))
    assert full["teacher/cluster_nmi"] == "0.6123" and full["parity_fp32_min_cosine"] == "1.000000"
    assert full["student/linear_top1"] == "82.50" and full["parity_int8"] == "FAIL"

    assert write_csv(rows, tmp_path / "out" / "cmp.csv").read_text() == to_csv(rows)
    assert write_markdown(rows, tmp_path / "out" / "cmp.md").read_text() == to_markdown(rows)


def test_unreadable_files_leave_blanks_with_a_warning(runs):
    (runs[0] / "eval" / "results.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"results.json: unreadable, left out \(JSONDecodeError\)"):
        full = compare_runs(runs[:1])[0]
    assert not any(key.startswith(("teacher/", "student/")) for key in full) and full["parity_fp32"] == "PASS"


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="at least one run directory"):
        compare_runs([])
    with pytest.raises(DataError, match=f"run directory not found: {tmp_path / 'nope'}"):
        compare_runs([tmp_path / "nope"])
