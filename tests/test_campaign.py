"""The GPU campaign rehearsed on the CPU: the device command, at a smoke scale on the shipped sample, goes through
every step, writes its report as it goes, ships a teacher kt-edge can import, and keeps to its budget."""

import json
import subprocess
import sys
import time

import pytest
from sample_kit import REPO

from kt_edge.models.importers import import_teacher
from kt_edge.models.parts import MAX_PART_BYTES

STEPS = ["machine", "gpu_tests", "throughput", "kmeans", "plan", "teacher", "students", "export"]  # in order


def _campaign(tmp_path, budget: float) -> tuple[dict, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/campaign.py",
            "--smoke",
            "--out",
            str(tmp_path / "out"),
            "--budget",
            str(budget),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=budget + 120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "out" / "campaign.json").read_text()), time.monotonic() - started


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    report, _ = _campaign(root, budget=600)
    return root / "out", report


def test_every_step_runs_or_says_why_not(rehearsal):
    _, report = rehearsal
    assert set(report["steps"]) == set(STEPS)
    for name, step in report["steps"].items():
        assert step["status"] == "done" or step["status"].startswith("skipped: no CUDA"), (name, step)
    assert report["steps"]["gpu_tests"]["counts"]["skipped"] > 0  # the GPU tests were collected, and skip here
    assert report["steps"]["throughput"]["train"]["seed_r50_to_r18_32px"]["batched"]["images_per_s"] > 0
    assert report["steps"]["kmeans"]["runs"]["torch"]["iterations"] == 5


def test_students_of_every_method_are_scored_at_equal_images_seen(rehearsal):
    _, report = rehearsal
    cells = report["steps"]["students"]["cells"]
    assert [c["cell"] for c in cells] == [
        f"{s} {m}" for s in ("resnet18", "alexnet") for m in ("seed", "compress-2q", "clusterfit", "alone")
    ]
    students = [r for r in report["grid"] if r["role"] in ("student", "alone")]
    assert len({r["images_seen"] for r in students}) == 1  # equal images seen, by construction
    assert all("knn_k200_t0.1" in r["metrics"] and "linear_top1" in r["metrics"] for r in report["grid"])
    assert len(report["verdicts"]) == 6 and all("vs alone" in v for v in report["verdicts"])
    assert report["steps"]["export"]["results"]["int8"]["accuracy"]["k"] == 200


def test_the_teacher_comes_back_in_parts_that_import_as_the_trained_teacher(rehearsal):
    out, report = rehearsal
    files = sorted(p.name for p in (out / "teacher").iterdir())
    assert files[0] == "model.json" and all(name.startswith("model.safetensors.part-") for name in files[1:])
    assert all((out / "teacher" / name).stat().st_size <= MAX_PART_BYTES for name in files)
    assert len(list(out.rglob("*"))) - 1 <= 8  # at most 8 files come back from the device (and one folder)
    teacher, projection = import_teacher(out / "teacher", "resnet18", 32)
    card = json.loads((out / "teacher" / "model.json").read_text())
    assert card["dtype"] == "float16" and card["arch"] == report["steps"]["plan"]["teacher_arch"]
    assert projection is not None and teacher.embed_dim == 512
    md = (out / "campaign.md").read_text()
    assert "| resnet18 seed |" in md and "Export of" in md


def test_a_run_cut_short_by_its_budget_ends_in_time_with_what_it_finished(tmp_path):
    report, _ = _campaign(tmp_path, budget=8)
    assert report["elapsed_s"] < 8 + 10  # the budget, and the step in flight stopping
    statuses = {name: step["status"] for name, step in report["steps"].items()}
    assert statuses["machine"] == "done" and statuses["students"].startswith("skipped: the budget is spent")
