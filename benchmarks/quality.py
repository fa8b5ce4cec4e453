"""The quality grid: does a small network learn more from a big self-supervised teacher than alone?

SEED (Fang et al., ICLR 2021) lifts a ResNet-18 from 52.5 to 57.6 ImageNet linear top-1 with a ResNet-50
teacher; CompRess (Koohpayegani et al. 2020) puts a distilled AlexNet above its supervised counterpart. This
grid measures that claim on each recipe's data. Per recipe, every teacher is trained once (the recipe's own,
and Jigsaw++ on the same architecture for the Noroozi et al. cluster path) and imported by every student cell.
Each student is distilled by every method, trained alone with the teacher's own method for the same budget
(the baseline, `alone`), and scored at random init (the floor). Every trained student is exported, and the
int8 model's k-NN is measured on its bundle.

    python benchmarks/quality.py recipes/cifar10-cpu.yaml
    python benchmarks/quality.py recipes/cifar10.yaml recipes/imagenette.yaml --students resnet18 --methods seed,alone

Writes benchmarks/results/quality-<recipe names>.{json,md}. Each cell is a run directory under --runs-dir that
keeps its row once done, so a stopped grid picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kt_edge_runtime.bench import machine_name  # noqa: E402

from kt_edge.atomic import write_json, write_text  # noqa: E402
from kt_edge.errors import KtEdgeError  # noqa: E402
from kt_edge.export.bundle import ParityError  # noqa: E402
from kt_edge.models.checkpoint import read_sidecar  # noqa: E402
from kt_edge.recipe import Recipe, load_recipe, recipe_from_dict  # noqa: E402
from kt_edge.stages import run as stages  # noqa: E402

SIZE = "<size>"  # stands for the recipe's distill.options.queue: one queue / bank size for every method
RECIPE = "recipe"  # stands for the recipe's own teacher (its method and options)
METHODS = {  # grid name -> (teacher, distill.method, options); no teacher: the student trains alone
    "seed": (RECIPE, "seed", {"queue": SIZE}),
    "compress-1q": (RECIPE, "compress", {"variant": "1q", "bank": SIZE}),
    "compress-2q": (RECIPE, "compress", {"variant": "2q", "bank": SIZE}),
    "regress": (RECIPE, "regress", {}),
    "cluster": ("jigsaw_pp", "cluster", {}),  # Noroozi et al.: pseudo-labels from a Jigsaw++ teacher
    "clusterfit": (RECIPE, "cluster", {}),  # ClusterFit (Yan et al. 2020): the same from the recipe's teacher
    "alone": (None, RECIPE, None),  # the baseline: the student trained with the teacher's own method
}
STUDENTS = ("resnet18", "alexnet")


def cell_recipe(base: Recipe, name: str, runs_dir: Path, **sections) -> Recipe:
    data = base.model_dump(mode="json")
    data.update(name=name, runs_dir=str(runs_dir))
    for section, fields in sections.items():
        data[section] = {**data[section], **fields}
    return recipe_from_dict(data, source=f"{base.name}/{name}")


def cached(recipe: Recipe, compute) -> dict:
    """The cell's row: kept in its run directory, recomputed only when the cell's recipe changed."""
    path = recipe.run_dir / "quality.json"
    if path.is_file():
        row = json.loads(path.read_text())
        if row.get("recipe") == recipe.digest():
            return row
    started = time.perf_counter()
    row = {**compute(), "recipe": recipe.digest()}
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_json(path, row)
    return row


def images_seen(folder: Path, batch_size: int) -> int | None:
    card = read_sidecar(folder)
    return card["steps"] * batch_size if card and "steps" in card else None


def teacher_cell(base: Recipe, method: str, runs_dir: Path) -> tuple[Path, dict]:
    teacher = {} if method == base.teacher.method else {"method": method, "options": {}, "layer": None}
    recipe = cell_recipe(base, f"teacher-{method}", runs_dir, teacher=teacher, eval={"baseline": False})

    def compute():
        folder = stages.teacher(recipe)
        return {
            "role": "teacher",
            "arch": recipe.teacher.arch,
            "method": method,
            "images_seen": images_seen(folder, recipe.teacher.train.batch_size),
            "metrics": stages.evaluation(recipe)["teacher"],
        }

    return recipe.run_dir / "teacher", {**cached(recipe, compute), "model": f"teacher {recipe.teacher.arch} {method}"}


def teacher_of(base: Recipe, name: str) -> str | None:
    """The teacher method a grid method learns from (None: it trains alone)."""
    teacher = METHODS[name][0]
    return base.teacher.method if teacher == RECIPE else teacher


def label(base: Recipe, name: str) -> str:
    return f"{base.teacher.method}-alone" if name == "alone" else name


def student_recipe(
    base: Recipe, student: str, name: str, teacher_dir: Path | None, runs_dir: Path, floor: bool
) -> Recipe:
    """The recipe of one student cell: the base recipe's budget, the grid's method, the shared teacher imported."""
    teacher_method, (_, method, options) = teacher_of(base, name), METHODS[name]
    if method == RECIPE:
        method, options = base.teacher.method, base.teacher.options
    size = base.distill.options.get("queue")
    options = {key: size if value == SIZE else value for key, value in options.items()}
    if method == base.distill.method:
        options = {**base.distill.options, **options}
    teacher = (
        {}
        if teacher_dir is None
        else {
            "checkpoint": str(teacher_dir),
            "format": "kt-edge",
            "layer": None,
            "method": teacher_method,
            "options": base.teacher.options if teacher_method == base.teacher.method else {},
        }
    )
    precisions = list(dict.fromkeys([*base.export.precisions, "int8"]))
    return cell_recipe(
        base,
        f"{student}-{name}",
        runs_dir,
        teacher=teacher,
        distill={"student": student, "method": method, "options": options},
        eval={"teacher": False, "baseline": floor},
        export={"precisions": precisions},
    )


def student_cell(
    base: Recipe, student: str, name: str, teacher_dir: Path | None, runs_dir: Path, floor: bool, export: bool = True
) -> list[dict]:
    """One distillation (or alone) cell; with ``floor`` also the random-init student, scored in the same pass;
    ``export``: the bundle too, and its int8 model's k-NN."""
    recipe = student_recipe(base, student, name, teacher_dir, runs_dir, floor)

    def compute():
        try:
            results, report = stages.run_stages(recipe, export_bundle=export)
            parity, failure = (report or {}).get("results", {}), None
        except ParityError as exc:  # the bundle is written, unverified: its measured parity still counts
            results = json.loads((recipe.run_dir / "eval" / "results.json").read_text())
            parity = json.loads((recipe.run_dir / "bundle" / "manifest.json").read_text())["parity"]["results"]
            failure = str(exc)
        return {
            "role": "alone" if teacher_dir is None else "student",
            "arch": student,
            "method": label(base, name),
            "teacher": teacher_of(base, name),
            "images_seen": images_seen(recipe.run_dir / "student", recipe.distill.train.batch_size),
            "metrics": results["student"],
            "random_init": results.get("random_init"),
            "export": {p: r["accuracy"] for p, r in parity.items()},
            "export_failure": failure,
        }

    row = cached(recipe, compute)
    rows = [{**row, "model": f"{student} {label(base, name)}"}]
    if row.get("random_init"):
        rows.insert(
            0,
            {
                "role": "random-init",
                "arch": student,
                "method": "random-init",
                "model": f"{student} random-init",
                "metrics": row["random_init"],
            },
        )
    return rows


def run_grid(base: Recipe, students: list[str], methods: list[str], runs_dir: Path) -> list[dict]:
    runs_dir = runs_dir / base.name
    rows, teachers = [], {}
    for method in dict.fromkeys(teacher_of(base, m) for m in methods if teacher_of(base, m)):
        teachers[method], row = teacher_cell(base, method, runs_dir)
        rows.append(row)
        print(f"{base.name}: {row['model']} done ({row['wall_seconds']:.0f} s)", flush=True)
    for student in students:
        for i, name in enumerate(methods):
            for row in student_cell(base, student, name, teachers.get(teacher_of(base, name)), runs_dir, floor=i == 0):
                rows.append(row)
                print(f"{base.name}: {row['model']} done ({row.get('wall_seconds', 0):.0f} s)", flush=True)
    return [{"dataset": base.name, **row} for row in rows]


def columns(rows: list[dict]) -> list[str]:
    """The metrics every row shares, in reading order: k-NN settings, linear, clusters, then transfer."""
    shared = set.intersection(*(set(r["metrics"]) for r in rows))
    order = [m for m in rows[0]["metrics"] if m.startswith("knn_")]
    order += ["linear_top1", "cluster_acc", "cluster_nmi"]
    order += [m for m in rows[0]["metrics"] if m.startswith("transfer_knn_")][:1] + ["transfer_linear_top1"]
    return [m for m in order if m in shared]


def verdicts(rows: list[dict], metric: str) -> list[str]:
    """Each distilled student against the same student trained alone, and against its teacher."""
    lines = []
    for row in rows:
        if row["role"] != "student":
            continue
        alone = next(
            (r for r in rows if r["role"] == "alone" and r["dataset"] == row["dataset"] and r["arch"] == row["arch"]),
            None,
        )
        teacher = next(
            (
                r
                for r in rows
                if r["role"] == "teacher" and r["dataset"] == row["dataset"] and r["method"] == row["teacher"]
            ),
            None,
        )
        value = row["metrics"][metric]
        parts = [f"{row['dataset']} {row['model']}: {metric} {value:.1f}"]
        if alone:
            delta = value - alone["metrics"][metric]
            parts.append(f"{delta:+.1f} vs alone ({'above' if delta > 0 else 'NOT above'})")
        if teacher:
            parts.append(f"{value - teacher['metrics'][metric]:+.1f} vs its teacher")
        lines.append("; ".join(parts))
    return lines


def markdown(report: dict) -> str:
    rows = report["rows"]
    metrics = columns(rows)
    head = ["dataset", "model", "images seen", *metrics, "int8 k-NN", "wall s"]
    lines = [
        f"# Quality grid: {', '.join(report['recipes'])}",
        "",
        f"Machine: {report['machine']}. Accuracies in % on each recipe's test split (NMI 0..1); "
        f"int8 k-NN is the exported int8 model's k=200, T=0.1 k-NN measured on its bundle.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        int8 = (r.get("export") or {}).get("int8")
        cells = [
            r["dataset"],
            r["model"],
            f"{r['images_seen']:,}" if r.get("images_seen") else "",
            *(f"{r['metrics'][m]:.3f}" if m.endswith("nmi") else f"{r['metrics'][m]:.1f}" for m in metrics),
            f"{int8['candidate_top1']:.1f}" if int8 else "",
            f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    first_knn = next((m for m in metrics if m.startswith("knn_")), None)
    if first_knn:
        lines += ["", "Distilled students against the student trained alone (same budget) and their teacher:", ""]
        lines += [f"- {line}" for line in verdicts(rows, first_knn)]
    failures = [f"- {r['dataset']} {r['model']}: {r['export_failure']}" for r in rows if r.get("export_failure")]
    if failures:
        lines += ["", "Exports that failed parity (bundle left unverified):", "", *failures]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", type=Path, help="one recipe per dataset (its teacher, student budget, eval)")
    p.add_argument("--students", default=",".join(STUDENTS), help=f"comma list from {', '.join(STUDENTS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of every recipe, e.g. --set distill.train.epochs=1",
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs/quality"))
    p.add_argument("--out", type=Path, default=None, help="JSON path; the markdown table goes beside it")
    args = p.parse_args(argv)
    students = [s for s in args.students.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    for value, known, what in ((students, STUDENTS, "student"), (methods, METHODS, "method")):
        unknown = [v for v in value if v not in known]
        if unknown:
            p.error(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        bases = [load_recipe(path, args.overrides) for path in args.recipes]
        for base in bases:
            missing = [s.path for s in (base.data.train, base.data.test) if s and not s.path.exists()]
            if missing:
                raise KtEdgeError(f"{base.name}: no data at {', '.join(map(str, missing))} (see the recipe's header)")
        started = time.perf_counter()
        rows = [row for base in bases for row in run_grid(base, students, methods, args.runs_dir)]
    except KtEdgeError as exc:
        sys.exit(f"error: {exc}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    report = {
        "benchmark": "quality",
        "recipes": [b.name for b in bases],
        "machine": gpu or machine_name(),
        "torch": torch.__version__,
        "students": students,
        "methods": methods,
        "recipe_files": {b.name: str(path) for b, path in zip(bases, args.recipes)},
        "budgets": {
            b.name: {
                "teacher": b.teacher.train.model_dump(),
                "student": b.distill.train.model_dump(),
                "train": b.data.train.model_dump(mode="json"),
                "image_size": b.data.image_size,
                "seed": b.seed,
            }
            for b in bases
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"quality-{'+'.join(report['recipes'])}.json"
    write_json(out, report)
    write_text(out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
