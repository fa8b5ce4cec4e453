"""Every GPU measurement kt-edge needs, in one command that stays inside a wall-clock budget.

A lent GPU gives an issue a few minutes, so this is one prepared run that writes each result into
``--out`` the moment it has it (a run cut short still returns everything finished), in this order:

  1. machine  the GPU, driver, torch and CUDA; then the GPU tests (``pytest -m gpu``: they skip elsewhere)
  2. throughput  SEED ResNet-50 -> ResNet-18 at 224 and 32 px, MoCo v2 and SimCLR teacher steps, feature
              extraction and the data path alone: images/s and the fraction of the GPU's bf16 peak
              (benchmarks/throughput.py; 224 px from CIFAR-10 upscaled, the images that travel)
  3. kmeans   1.28M x 2048 -> 2000 clusters, 20 iterations, on synthetic data made on the GPU: the torch
              engine, and faiss-gpu where installed (benchmarks/kmeans.py)
  4. teacher  a MoCo v2 teacher on CIFAR-10 at 32 px, trained for the time the budget leaves it (ResNet-50
              when it can see 100 epochs in that time, else ResNet-18), scored, and written at once as fp16
              safetensors in parts of at most 15 MiB with its sidecar (``teacher/``: reassembled and sha256-
              checked by kt-edge on import, ``kt_edge.models.parts``)
  5. students ResNet-18, then AlexNet, with seed, compress-2q, clusterfit and alone (the teacher's own method),
              at equal images seen; k-NN (k=200, T=0.1) on the full test split and the linear probe
              (benchmarks/quality.py's cells); then the best student's int8 export and its parity

Budgets come from the throughput measured in step 2, never from a fixed epoch count: what is left after
steps 1 to 3, less what scoring and export take, is split 40 / 60 between the teacher and the student cells,
and every training stage's steps are its seconds times its measured images/s over the batch. A timer stops
the run at the budget (SIGTERM: a training stage writes its resume point and stops), so the whole command
ends inside it.

Device run (CIFAR-10 and the wheels the device image lacks are packed first by
``python scripts/pack_campaign.py``, into data/cifar10 and .whl, ignored folders that travel as ``carry``):

    device run, timeout_s 600, carry ["data/cifar10", ".whl"], command:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:.:export PYTHONUNBUFFERED=1 && set -o pipefail &&
    python3 benchmarks/campaign.py --out $OUT --budget 540 2>&1 | tee $OUT/campaign.log

Results come back as $OUT/campaign.{json,md,log} and $OUT/teacher/ (sidecar and parts): at most 8 files.
Rehearsal on the CPU, the same run at a smoke scale on the shipped sample (tests/test_campaign.py runs it):

    python benchmarks/campaign.py --smoke --out /tmp/campaign --budget 110
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import kmeans as kmeans_benchmark  # noqa: E402
import quality  # noqa: E402
import throughput  # noqa: E402

from kt_edge.atomic import write_json, write_text  # noqa: E402
from kt_edge.errors import Interrupted  # noqa: E402
from kt_edge.models.checkpoint import SIDECAR, WEIGHTS  # noqa: E402
from kt_edge.models.parts import write_parts  # noqa: E402
from kt_edge.recipe import recipe_from_dict  # noqa: E402
from kt_edge.stages import stamp  # noqa: E402
from kt_edge.stages.run import bundle  # noqa: E402

STEPS = ("machine", "gpu_tests", "throughput", "kmeans", "plan", "teacher", "students", "export")
STUDENTS = ("resnet18", "alexnet")
METHODS = ("seed", "compress-2q", "clusterfit", "alone")
TEACHER_SHARE = 0.4  # of the training seconds; the student cells share the rest
SAFETY = 0.85  # of every estimate: first steps, cudnn's autotuning and DataLoader starts are not in the rates
R50_EPOCHS = 100  # a ResNet-50 teacher needs about this many epochs to pull ahead of a ResNet-18 at 32 px
KNN = "knn_k200_t0.1"


@dataclass(frozen=True)
class Scale:
    """What differs between the device run and its rehearsal: the data and the sizes."""

    data: Path
    train_subset: int | None
    test_subset: int | None
    batch: int
    workers: int
    throughput: dict  # benchmarks/throughput.py arguments
    kmeans: dict  # benchmarks/kmeans.py gpu_scale arguments
    export_subsets: tuple[int, int]  # train and test images the int8 parity is measured on
    cluster_k: int
    log_every: int
    step_cap: int | None = None  # the most steps a stage takes (the rehearsal's: it shows the path, not a result)
    linear: dict | None = None  # eval.linear settings; None: the defaults (weight decay from a grid)


GPU = Scale(
    data=REPO / "data" / "cifar10",
    train_subset=None,
    test_subset=None,
    batch=512,
    workers=12,
    throughput={
        "sizes": [224, 32],
        "batch_224": 256,
        "batch_32": 512,
        "subset_224": 4096,
        "subset_32": 16384,
        "steps": 30,
        "warmup": 10,
        "extract_images": 8192,
    },
    kmeans={"n": 1_281_167, "dim": 2048, "k": 2000, "niter": 20},
    export_subsets=(10000, 10000),
    cluster_k=500,
    log_every=10,
)
SMOKE = Scale(
    data=REPO / "data" / "sample" / "cifar10",
    train_subset=256,
    test_subset=64,
    batch=16,
    workers=0,
    throughput={
        "sizes": [32],
        "batch_224": 2,
        "batch_32": 2,
        "subset_224": 16,
        "subset_32": 16,
        "steps": 2,
        "warmup": 1,
        "extract_images": 4,
    },
    kmeans={"n": 4096, "dim": 32, "k": 16, "niter": 5},
    export_subsets=(256, 64),
    cluster_k=8,
    log_every=1,
    step_cap=2,
    linear={"weight_decay": 1e-4, "max_iter": 50},
)


class Campaign:
    """The run's report, written whole (JSON and markdown) after every result; a budget every step checks."""

    def __init__(self, out: Path, budget: float, scale: Scale, runs_dir: Path):
        self.out, self.budget, self.scale, self.runs_dir = out, budget, scale, runs_dir
        self.started = time.monotonic()
        self.report = {
            "benchmark": "campaign",
            "budget_s": budget,
            "scale": "smoke" if scale is SMOKE else "gpu",
            "steps": {},
        }
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        write_json(self.out / "campaign.json", self.report)
        write_text(self.out / "campaign.md", markdown(self.report))

    def spent(self, name: str) -> bool:
        """True (and the step recorded as skipped) once the budget is spent."""
        if self.left() > 0:
            return False
        self.report["steps"][name] = {"status": "skipped: the budget is spent"}
        self.save()
        return True

    @contextlib.contextmanager
    def step(self, name: str):
        """Time a step and record it; a failure is recorded and the run goes on to the next step."""
        entry = self.report["steps"].setdefault(name, {})
        began = time.monotonic()
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        try:
            yield entry
            entry.setdefault("status", "done")
        except Interrupted as exc:
            entry.update(status="stopped at the budget", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one step's failure must not cost the others
            entry.update(
                status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:]
            )
            print(entry["traceback"], flush=True)
        finally:
            entry["seconds"] = round(time.monotonic() - began, 1)
            self.save()


# --------------------------------------------------------------------------- steps 1 to 3


def machine_step(c: Campaign) -> None:
    with c.step("machine") as entry:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        entry.update(throughput.machine(device))
        entry["driver"] = _nvidia_smi("driver_version")
    if c.spent("gpu_tests"):
        return
    with c.step("gpu_tests") as entry:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-o",
                "addopts=",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/gpu",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=max(5.0, min(90.0, c.left() * 0.15)),
        )
        summary = (proc.stdout.strip().splitlines() or [""])[-1]
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
        entry.update(returncode=proc.returncode, summary=summary, counts=counts, output_tail=proc.stdout[-2000:])
        if not torch.cuda.is_available():
            entry["status"] = "skipped: no CUDA device (every GPU test skips)"


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def throughput_step(c: Campaign) -> dict:
    if c.spent("throughput"):
        return {}
    with c.step("throughput") as entry:
        args = throughput.parse(
            [
                "--data-32",
                str(c.scale.data / "train"),
                "--data-224",
                str(c.scale.data / "train"),
                "--sizes",
                ",".join(map(str, c.scale.throughput["sizes"])),
                "--workers",
                str(c.scale.workers),
            ]
            + [f"--{k.replace('_', '-')}={v}" for k, v in c.scale.throughput.items() if k != "sizes"]
        )
        entry.update(throughput.run(args))
    return entry


def kmeans_step(c: Campaign) -> None:
    if c.spent("kmeans"):
        return
    with c.step("kmeans") as entry:
        entry.update(kmeans_benchmark.gpu_scale(**c.scale.kmeans))
        if not torch.cuda.is_available():
            entry["note"] = "no CUDA device: the torch engine ran on the CPU at a smoke scale"


# --------------------------------------------------------------------------- steps 4 and 5


@dataclass
class Plan:
    """Steps for each training stage, from the measured images/s."""

    teacher_arch: str
    teacher_steps: int
    student_steps: int
    teacher_seconds: float
    student_seconds: float
    rates: dict


def plan_step(c: Campaign, measured: dict):
    """The plan and the recipe it makes, or None when nothing can be planned (the step says why)."""
    planned = []
    with c.step("plan") as entry:
        scale = c.scale
        n_train = scale.train_subset or sum(1 for _ in (scale.data / "train").rglob("*.*"))
        n_test = scale.test_subset or sum(1 for _ in (scale.data / "test").rglob("*.*"))
        p = plan(c, measured, n_train, n_test)
        entry.update(asdict(p), n_train=n_train, n_test=n_test)
        planned = [p, base_recipe(c, p, n_train)]
    return planned or None


def plan(c: Campaign, measured: dict, n_train: int, n_test: int) -> Plan:
    train = measured.get("train", {})
    rate = {
        key: (train.get(key) or {}).get("batched", {}).get("images_per_s")
        for key in ("moco_r18_32px", "moco_r50_32px", "seed_r50_to_r18_32px")
    }
    extract = (measured.get("extract", {}).get("r50_32px") or {}).get("end_to_end", {}).get("images_per_s")
    if not all(rate.values()) or not extract:
        raise RuntimeError(f"throughput at 32 px was not measured ({rate}, extract {extract}); no budget to plan")
    scoring = 2.0 + (n_train + n_test) / (2 * extract)  # embed both splits (a ResNet-18 at twice R50's rate), probe
    models = 1 + len(STUDENTS) * len(METHODS) + len(STUDENTS)  # teacher, cells, random-init floors
    reserve = models * scoring + 0.1 * c.left()  # and the export of the best student
    training = max(0.0, (c.left() - reserve) * SAFETY)
    teacher_seconds = TEACHER_SHARE * training
    student_seconds = (training - teacher_seconds) / (len(STUDENTS) * len(METHODS))
    arch = "resnet50" if teacher_seconds * rate["moco_r50_32px"] / n_train >= R50_EPOCHS else "resnet18"
    teacher_rate = rate["moco_r50_32px" if arch == "resnet50" else "moco_r18_32px"]
    cap = c.scale.step_cap or float("inf")
    steps = lambda seconds, r: int(min(cap, max(1, seconds * r / c.scale.batch)))  # noqa: E731
    return Plan(
        arch,
        steps(teacher_seconds, teacher_rate),
        steps(student_seconds, rate["seed_r50_to_r18_32px"]),
        teacher_seconds,
        student_seconds,
        {**rate, "extract_r50_32px": extract, "scoring_s": scoring},
    )


def base_recipe(c: Campaign, p: Plan, n_train: int):
    """The campaign's CIFAR-10 recipe: MoCo v2 as the official CIFAR-10 demo trains it (SGD, lr 0.06 at batch
    512, queue 4096, momentum 0.99, temperature 0.1), every stage's steps from the plan."""
    batch = c.scale.batch
    queue = max(batch, min(4096, n_train // 4) // batch * batch)
    train = {
        "epochs": 10**6,
        "batch_size": batch,
        "optimizer": "sgd",
        "lr": 0.06 * batch / 512,
        "weight_decay": 5e-4,
        "momentum": 0.9,
        "log_every": c.scale.log_every,
    }
    split = lambda name, subset: {"path": str(c.scale.data / name), **({"subset": subset} if subset else {})}  # noqa: E731
    return recipe_from_dict(
        {
            "name": "campaign-cifar10",
            "seed": 0,
            "runs_dir": str(c.runs_dir),
            "data": {
                "train": split("train", c.scale.train_subset),
                "test": split("test", c.scale.test_subset),
                "image_size": 32,
                "workers": c.scale.workers,
                "cache": True,
                "cache_dir": str(c.runs_dir / "cache"),
            },
            "teacher": {
                "arch": p.teacher_arch,
                "method": "moco",
                "train": {**train, "max_steps": p.teacher_steps},
                "options": {"queue": queue, "momentum": 0.99, "temperature": 0.1, "hidden": 2048, "dim": 128},
            },
            "distill": {
                "student": "resnet18",
                "method": "seed",
                "train": {**train, "max_steps": p.student_steps},
                "options": {"queue": queue, "hidden": 2048},
            },
            "cluster": {"k": c.scale.cluster_k},
            "eval": {
                "knn": [{"k": 200, "t": 0.1}],
                "protocols": ["knn", "linear", "clusters"],
                **({"linear": c.scale.linear} if c.scale.linear else {}),
            },
            "export": {"precisions": ["fp32", "int8"]},
        },
        source="campaign",
    )


def teacher_step(c: Campaign, base) -> Path | None:
    if c.spent("teacher"):
        return None
    with c.step("teacher") as entry:
        folder, row = quality.teacher_cell(base, base.teacher.method, c.runs_dir / base.name)
        entry.update(
            row=row, arch=base.teacher.arch, steps=base.teacher.train.max_steps, images_seen=row.get("images_seen")
        )
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        files = write_parts(
            folder,
            c.out / "teacher",
            WEIGHTS,
            SIDECAR,
            source="benchmarks/campaign.py",
            machine=gpu or "CPU (rehearsal)",
            train_seconds=row.get("wall_seconds"),
            knn_k200_t01=row["metrics"].get(KNN),
            recipe=stamp.read(folder),
        )
        entry["parts"] = [f.name for f in files]
        return folder
    return None


def students_step(c: Campaign, base, teacher_dir: Path) -> list[dict]:
    """The cells in order of importance (ResNet-18 first), each on its own: a failed cell is recorded and the
    next one runs; once the budget is spent the rest are skipped."""
    rows = []
    if c.spent("students"):
        return rows
    with c.step("students") as entry:
        entry["cells"] = cells = []
        for student in STUDENTS:
            for i, name in enumerate(METHODS):
                cell = {"cell": f"{student} {name}"}
                cells.append(cell)
                if c.left() <= 0:
                    cell["status"] = "skipped: the budget is spent"
                    continue
                teacher = teacher_dir if quality.teacher_of(base, name) else None  # alone: no teacher
                try:
                    for row in quality.student_cell(
                        base, student, name, teacher, c.runs_dir / base.name, floor=i == 0, export=False
                    ):
                        rows.append({"dataset": base.name, **row})
                        cell.setdefault("rows", []).append(
                            {k: row.get(k) for k in ("model", "images_seen", "wall_seconds", "metrics")}
                        )
                    cell["status"] = "done"
                except Interrupted as exc:
                    cell.update(status="stopped at the budget", error=str(exc))
                except Exception as exc:  # noqa: BLE001 - one cell's failure must not cost the others
                    cell.update(
                        status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-2000:]
                    )
                c.save()
    return rows


def export_step(c: Campaign, base, rows: list[dict], teacher_dir: Path) -> None:
    if c.spent("export"):
        return
    with c.step("export") as entry:
        students = [r for r in rows if r["role"] == "student"]
        if not students:
            entry["status"] = "skipped: no distilled student"
            return
        best = max(students, key=lambda r: r["metrics"][KNN])
        cell = quality.student_recipe(
            base, best["arch"], best["method"], teacher_dir, c.runs_dir / base.name, floor=False
        )
        bank, test = c.scale.export_subsets
        data = cell.model_dump(mode="json")
        data["data"]["train"]["subset"], data["data"]["test"]["subset"] = bank, test
        report = bundle(recipe_from_dict(data, source="campaign export"))
        entry.update(student=best["model"], parity_images={"bank": bank, "test": test}, results=report["results"])


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    steps = report["steps"]
    m = steps.get("machine", {})
    lines = [
        f"# kt-edge GPU campaign ({report['scale']} scale)",
        "",
        f"Machine: {m.get('device', '?')} (driver {m.get('driver')}, torch {m.get('torch')}, CUDA "
        f"{m.get('cuda')}); budget {report['budget_s']:.0f} s, used {report.get('elapsed_s', 0):.0f} s.",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s.get('status', 'running')} | {s.get('seconds', '')} |" for name, s in steps.items()]
    tests = steps.get("gpu_tests", {})
    if tests.get("summary"):
        lines += ["", f"GPU tests: {tests['summary']}"]
    train = steps.get("throughput", {}).get("train", {})
    if train:
        lines += ["", "| throughput | path | images/s | TFLOP/s | of bf16 peak |", "|---|---|---|---|---|"]
        for name, paths in train.items():
            for path, r in paths.items():
                share = r.get("fraction_of_bf16_peak")
                lines.append(
                    f"| {name} | {path} | {r['images_per_s']:.0f} | {r['achieved_tflops']:.2f} | "
                    f"{'' if share is None else f'{100 * share:.1f}%'} |"
                )
    km = steps.get("kmeans", {}).get("runs")
    if km:
        lines += [
            "",
            f"k-means {steps['kmeans']['n']:,} x {steps['kmeans']['dim']} -> {steps['kmeans']['k']}, "
            f"{steps['kmeans']['niter']} iterations: "
            + "; ".join(
                f"{name} {r['seconds']:.2f} s" if "seconds" in r else f"{name}: {r['skipped']}"
                for name, r in km.items()
            ),
        ]
    rows = ([steps["teacher"]["row"]] if steps.get("teacher", {}).get("row") else []) + [
        r for r in report.get("grid", [])
    ]
    if rows:
        lines += ["", "| model | images seen | k-NN k=200 T=0.1 | linear top-1 | wall s |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r.get('images_seen') or ''} | {r['metrics'].get(KNN, float('nan')):.1f}"
                f" | {r['metrics'].get('linear_top1', float('nan')):.1f} | {r.get('wall_seconds', '')} |"
            )
        if report.get("verdicts"):
            lines += ["", *[f"- {v}" for v in report["verdicts"]]]
    exported = steps.get("export", {}).get("results")
    if exported:
        lines += [
            "",
            f"Export of {steps['export']['student']}: "
            + "; ".join(
                f"{p} min cosine {r['golden']['min_cosine']:.4f}, k-NN drop {r['accuracy']['drop']:+.2f}"
                for p, r in exported.items()
            ),
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the run


def stop_at(budget: float) -> threading.Timer:
    """SIGTERM this process at the budget: a training stage writes its resume point and stops."""
    timer = threading.Timer(budget, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    return timer


def run(out: Path, budget: float, scale: Scale, runs_dir: Path) -> dict:
    c = Campaign(out, budget, scale, runs_dir)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # outside training loops, a stop is one exception
    timer = stop_at(budget)
    try:
        c.report["scale_params"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(scale).items()}
        machine_step(c)
        measured = throughput_step(c)
        kmeans_step(c)
        planned = plan_step(c, measured)
        teacher_dir = teacher_step(c, planned[1]) if planned else None
        if teacher_dir is not None:
            base = planned[1]
            rows = students_step(c, base, teacher_dir)
            teacher_row = c.report["steps"]["teacher"]["row"]
            c.report["grid"] = rows
            c.report["verdicts"] = quality.verdicts([{"dataset": base.name, **teacher_row}, *rows], KNN)
            c.save()
            export_step(c, base, rows, teacher_dir)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
        for name in STEPS:  # the steps that never started, and why
            c.report["steps"].setdefault(
                name,
                {
                    "status": "skipped: the budget is spent"
                    if c.left() <= 0
                    else "skipped: a step it needs did not finish"
                },
            )
        c.save()
    return c.report


def _interrupt(signum, _frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name} (the campaign's budget)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder ($OUT on the device)")
    p.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for the whole run")
    p.add_argument("--smoke", action="store_true", help="the CPU rehearsal: the shipped sample, smoke sizes")
    p.add_argument("--runs-dir", type=Path, default=None, help="run directories (default: a folder beside --out)")
    args = p.parse_args(argv)
    scale = SMOKE if args.smoke else GPU
    if not (scale.data / "train").is_dir():
        sys.exit(f"error: no CIFAR-10 at {scale.data}: run `python scripts/pack_campaign.py` first")
    runs_dir = args.runs_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "kt-edge-campaign"
    report = run(args.out, args.budget, scale, runs_dir)
    print(markdown(report))
    print(f"wrote {args.out / 'campaign.json'} and {args.out / 'campaign.md'}")


if __name__ == "__main__":
    main()
