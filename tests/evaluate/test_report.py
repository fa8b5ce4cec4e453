"""The run report: a real tiny run (2 training steps per stage, eval, export, bench) rendered to HTML and markdown."""

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kt_edge import atomic
from kt_edge.errors import DataError
from kt_edge.evaluate.protocols import evaluate_model
from kt_edge.evaluate.report import write_report
from kt_edge.evaluate.report.sections import read_curves
from kt_edge.models.checkpoint import load_backbone
from kt_edge.recipe import recipe_from_dict
from kt_edge.stages import run as stages
from kt_edge.stages.inputs import labelled_splits

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "cifar10"
SECTIONS = ("summary", "training", "evaluation", "map", "per-class", "export", "latency")
BANK, TEST = 240, 60  # the export's parity k-NN uses k=200, so the bank needs at least 200 images


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, one_thread) -> Path:
    """Teacher and student trained 2 steps each, evaluated, exported and benchmarked, all with the real code."""
    if not SAMPLE.is_dir():
        pytest.skip(f"the shipped CIFAR-10 sample is missing at {SAMPLE}")
    train = {"epochs": 1, "max_steps": 2, "batch_size": 16, "log_every": 1}
    recipe = recipe_from_dict(
        {
            "name": "tiny",
            "device": "cpu",
            "runs_dir": str(tmp_path_factory.mktemp("runs")),
            "data": {
                "train": {"path": str(SAMPLE / "train"), "subset": BANK},
                "test": {"path": str(SAMPLE / "test"), "subset": TEST},
                "image_size": 16,
                "workers": 0,
            },
            "teacher": {"arch": "alexnet", "method": "moco", "train": train, "options": {"queue": 64, "hidden": 64}},
            "distill": {"student": "alexnet", "method": "seed", "train": train, "options": {"queue": 64, "hidden": 64}},
            "eval": {"knn": [{"k": 20, "t": 0.07}], "protocols": ["knn", "clusters"]},
        }
    )
    stages.student(recipe, teacher_dir=stages.teacher(recipe))
    bank, test = labelled_splits(recipe)
    results = {
        stage: evaluate_model(load_backbone(recipe.run_dir / stage)[0], bank, test, recipe.eval, device="cpu").metrics
        for stage in ("teacher", "student")
    }
    atomic.write_json(recipe.run_dir / "eval" / "results.json", results)
    stages.bundle(recipe)
    from kt_edge_runtime.cli import main as runtime_cli

    bundle = recipe.run_dir / "bundle"
    assert (
        runtime_cli(
            [
                "bench",
                str(bundle),
                "--batch-sizes",
                "1,4",
                "--iters",
                "3",
                "--warmup",
                "1",
                "--json",
                str(bundle / "bench-fp32.json"),
            ]
        )
        == 0
    )
    return recipe.run_dir


class Page(HTMLParser):
    """The parts of a report page the tests look at."""

    def __init__(self, text: str):
        super().__init__()
        self.images: dict[str, list[str]] = {}  # section id -> img src
        self.missing: dict[str, str] = {}  # section id -> missing text
        self.external: list[str] = []
        self._section = None
        self._in_missing = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs["id"]
            self.images.setdefault(self._section, [])
        elif tag == "img":
            self.images[self._section].append(attrs["src"])
        elif tag == "p" and attrs.get("class") == "missing":
            self._in_missing = True
        for key in ("src", "href"):
            if key in attrs and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])

    def handle_data(self, data):
        if self._in_missing:
            self.missing[self._section] = data.strip()
            self._in_missing = False


def _png_count(page: Page) -> int:
    sources = [src for srcs in page.images.values() for src in srcs]
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    return len(sources)


def _copy(run_dir: Path, dest: Path, keep: tuple[str, ...]) -> Path:
    dest.mkdir()
    for name in keep:
        source = run_dir / name
        if source.is_dir():
            shutil.copytree(source, dest / name)
        elif source.is_file():
            shutil.copy(source, dest / name)
    return dest


def test_full_run_renders_every_section_with_inline_images(full_run, tmp_path):
    run_dir = _copy(
        full_run, tmp_path / "tiny", ("recipe.yaml", "metrics.jsonl", "teacher", "student", "eval", "bundle")
    )
    html_path, md_path = write_report(run_dir, map_points=40, max_bank=BANK, max_test=TEST)
    assert (html_path, md_path) == (run_dir / "report.html", run_dir / "report.md")
    page = Page(html_path.read_text())
    assert tuple(page.images) == SECTIONS and page.missing == {} and page.external == []
    assert {k: len(v) for k, v in page.images.items()} == {
        "summary": 0,
        "training": 1,
        "evaluation": 0,
        "map": 1,
        "per-class": 2,
        "export": 0,
        "latency": 0,
    }
    assert _png_count(page) == 4

    md = md_path.read_text()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    # the report's k-NN uses the same bank, test split and setting as eval: the same top-1
    student_top1 = results["student"]["knn_k20_t0.07"]
    assert f"scored on {TEST} test images: top-1 {student_top1:.2f}%" in md
    assert f"| knn_k20_t0.07 | {results['teacher']['knn_k20_t0.07']:.2f} | {student_top1:.2f} |" in md
    assert re.search(r"\| fp32 \| PASS \| 16 \| (1\.000000|0\.99999\d) \|", md), md
    assert re.search(r"\| onnxruntime \| fp32 \| .+ \| 4 \| ", md)
    assert "| teacher | 2 |" in md and "| distill | 2 |" in md  # two steps per stage
    assert "| teacher | alexnet moco |" in md and "| student | alexnet |" in md
    assert sum(1 for line in md.splitlines() if re.match(r"\| (airplane|truck|cat) \| \d+ \| ", line)) == 3


def test_missing_stages_are_reported_not_crashed(full_run, tmp_path):
    teacher_only = _copy(full_run, tmp_path / "teacher-only", ("recipe.yaml", "teacher"))
    page = Page(write_report(teacher_only, map_points=40, max_bank=BANK, max_test=TEST)[0].read_text())
    assert tuple(page.images) == SECTIONS
    assert set(page.missing) == {"training", "evaluation", "per-class", "export", "latency"}
    assert page.missing["per-class"] == "missing: no student checkpoint"
    assert page.images["map"] and _png_count(page) == 1  # the teacher's map alone

    empty = tmp_path / "empty"
    empty.mkdir()
    html_path, md_path = write_report(empty)
    page = Page(html_path.read_text())
    assert set(page.missing) == set(SECTIONS) - {"summary"} and _png_count(page) == 0
    assert "_missing: no recipe.yaml in the run directory_" in md_path.read_text()
    with pytest.raises(DataError, match="run directory not found"):
        write_report(tmp_path / "nope")


def test_a_bank_smaller_than_k_drops_only_the_per_class_view(full_run, tmp_path):
    run_dir = _copy(full_run, tmp_path / "small-bank", ("recipe.yaml", "teacher", "student"))
    page = Page(write_report(run_dir, map_points=40, max_bank=10, max_test=TEST)[0].read_text())
    assert page.missing["per-class"] == "missing: eval.knn k=20 exceeds the 10 images of the k-NN bank"
    assert len(page.images["map"]) == 1 and "map" not in page.missing


def test_missing_data_is_reported(full_run, tmp_path):
    run_dir = _copy(full_run, tmp_path / "moved", ("recipe.yaml", "teacher", "student"))
    recipe = (run_dir / "recipe.yaml").read_text().replace(str(SAMPLE), str(tmp_path / "gone"))
    (run_dir / "recipe.yaml").write_text(recipe)
    page = Page(write_report(run_dir)[0].read_text())
    assert page.missing["map"].startswith(f"missing: data folder not found: {tmp_path / 'gone'}")


def test_curves_keep_the_latest_run_of_each_stage(tmp_path):
    lines = [
        {"stage": "teacher", "step": 1, "loss": 9.0},
        {"stage": "teacher", "step": 2, "loss": 8.0},
        {"stage": "teacher", "step": 1, "loss": 7.0},  # the stage was run again from scratch
        {"stage": "teacher", "step": 2, "loss": 6.0},
        {"stage": "teacher", "step": 3, "loss": 5.0},
        {"stage": "distill", "step": 1, "loss": 4.0},
        {"stage": "distill", "step": 2, "loss": 3.0},
        {"stage": "teacher", "step": 3, "loss": 4.5},  # resumed: step 3 logged again
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "distill", "st')  # cut short
    curves = read_curves(path)
    assert list(curves) == ["teacher", "distill"]
    assert [(r["step"], r["loss"]) for r in curves["teacher"]] == [(1, 7.0), (2, 6.0), (3, 4.5)]
    assert [r["loss"] for r in curves["distill"]] == [4.0, 3.0]
