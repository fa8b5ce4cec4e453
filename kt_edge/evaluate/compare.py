"""Read what a run directory measured, and put several runs side by side (CSV and markdown).

A run is read leniently: a stage that never ran, or a file that cannot be parsed, leaves its
cells blank rather than failing the comparison. Sources, all optional: ``recipe.yaml``,
``teacher/model.json``, ``student/model.json``, ``eval/results.json`` ({model: {metric: value}}),
``bundle/manifest.json`` (parity measured at export) and ``bundle/bench*.json`` (files written by
``kt-edge-runtime bench --json``).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

import yaml

from kt_edge import atomic
from kt_edge.errors import DataError
from kt_edge.run_dir import RunDir

MODELS = ("teacher", "student", "random_init")  # the usual order of eval/results.json entries
IDENTITY = ("run", "teacher", "distill", "student")


def _json(path: Path) -> Any:
    """Parsed JSON, or None (with a warning naming the file) when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"{path}: unreadable, left out ({exc.__class__.__name__})", stacklevel=3)
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_recipe(run_dir: Path) -> dict:
    """The resolved recipe as a plain mapping ({} when absent or unreadable); not validated."""
    path = RunDir(run_dir).recipe
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        warnings.warn(f"{path}: unreadable, left out ({exc.__class__.__name__})", stacklevel=2)
        return {}
    return data if isinstance(data, dict) else {}


def read_results(run_dir: Path) -> dict[str, dict[str, float]]:
    """eval/results.json as {model: {metric: value}}, numbers only, teacher/student/random_init first."""
    data = _json(RunDir(run_dir).results)
    if not isinstance(data, dict):
        return {}
    order = [m for m in MODELS if m in data] + [m for m in data if m not in MODELS]
    results = {}
    for model in order:
        if isinstance(data[model], dict):
            results[model] = {k: float(v) for k, v in data[model].items() if _is_number(v)}
    return results


def read_manifest(run_dir: Path) -> dict | None:
    """bundle/manifest.json as written at export, or None without a bundle."""
    data = _json(RunDir(run_dir).bundle / "manifest.json")
    return data if isinstance(data, dict) else None


def read_parity(run_dir: Path) -> dict[str, dict]:
    """Per precision: passed, golden samples / min cosine / max abs error, k-NN top-1 of reference and export."""
    manifest = read_manifest(run_dir) or {}
    results = (manifest.get("parity") or {}).get("results") or {}
    parity = {}
    for precision, res in results.items():
        if not isinstance(res, dict):
            continue
        golden, accuracy = res.get("golden") or {}, res.get("accuracy") or {}
        parity[precision] = {
            "passed": res.get("passed"),
            "samples": golden.get("samples"),
            "min_cosine": golden.get("min_cosine"),
            "max_abs_err": golden.get("max_abs_err"),
            "reference_top1": accuracy.get("reference_top1"),
            "top1": accuracy.get("candidate_top1"),
            "top1_drop": accuracy.get("drop"),
        }
    return parity


def read_bench(run_dir: Path) -> list[dict]:
    """Latency rows from bundle/bench*.json: backend, precision, device, batch, p50/p90/p99 ms, images/s."""
    rows = []
    for path in sorted(RunDir(run_dir).bundle.glob("bench*.json")):
        data = _json(path)
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            continue
        for r in data["results"]:
            if isinstance(r, dict) and _is_number(r.get("batch")) and _is_number(r.get("p50_ms")):
                rows.append(
                    {
                        "backend": data.get("backend", ""),
                        "precision": data.get("precision", ""),
                        "device": data.get("device", ""),
                        "batch": int(r["batch"]),
                        "p50_ms": r["p50_ms"],
                        "p90_ms": r.get("p90_ms"),
                        "p99_ms": r.get("p99_ms"),
                        "throughput_ips": r.get("throughput_ips"),
                    }
                )
    return rows


def _sidecar(run_dir: Path, stage: str) -> dict:
    data = _json(RunDir(run_dir).model(stage) / "model.json")
    return data if isinstance(data, dict) else {}


def describe(run_dir: Path) -> dict[str, str]:
    """Teacher 'arch method', distill method and student arch: from checkpoints, else from the recipe."""
    recipe = read_recipe(run_dir)
    teacher_cfg = recipe.get("teacher") if isinstance(recipe.get("teacher"), dict) else {}
    distill_cfg = recipe.get("distill") if isinstance(recipe.get("distill"), dict) else {}
    teacher, student = _sidecar(run_dir, "teacher"), _sidecar(run_dir, "student")
    teacher_text = " ".join(
        str(v)
        for v in (teacher.get("arch", teacher_cfg.get("arch")), teacher.get("method", teacher_cfg.get("method")))
        if v
    )
    return {
        "teacher": teacher_text,
        "distill": str(student.get("method") or distill_cfg.get("method") or ""),
        "student": str(student.get("arch") or distill_cfg.get("student") or ""),
    }


def run_row(run_dir: Path) -> dict[str, Any]:
    """One run as a flat row: identity, '<model>/<metric>', 'parity_<precision>...', 'latency_...'."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    row: dict[str, Any] = {"run": run_dir.name, **describe(run_dir)}
    for model, metrics in read_results(run_dir).items():
        row.update({f"{model}/{name}": value for name, value in metrics.items()})
    for precision, p in read_parity(run_dir).items():
        row[f"parity_{precision}"] = "" if p["passed"] is None else ("PASS" if p["passed"] else "FAIL")
        row[f"parity_{precision}_min_cosine"] = p["min_cosine"]
        row[f"parity_{precision}_top1_drop"] = p["top1_drop"]
    bench = read_bench(run_dir)
    for b in bench:
        row[f"latency_{b['precision']}_{b['backend']}_b{b['batch']}_p50_ms"] = b["p50_ms"]
    if bench:
        row["bench_device"] = "; ".join(dict.fromkeys(str(b["device"]) for b in bench))
    return row


def compare_runs(run_dirs: list[Path | str]) -> list[dict[str, Any]]:
    """One row per run, in the order given; a key a run lacks is a blank cell in the writers."""
    if not run_dirs:
        raise DataError("compare needs at least one run directory")
    return [run_row(Path(d)) for d in run_dirs]


def columns(rows: list[dict]) -> list[str]:
    """Identity first, then every other key in order of first appearance across rows."""
    seen = dict.fromkeys(IDENTITY)
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def format_value(name: str, value: Any) -> str:
    """A cell as text: blank for missing, cosines to 6 places, NMI/ARI to 4, other numbers to 2."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if "cosine" in name:
            return f"{value:.6f}"
        if name.endswith(("nmi", "ari")):
            return f"{value:.4f}"
        return f"{value:.2f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table; '|' in cells is escaped."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)]) + "\n"


def to_markdown(rows: list[dict]) -> str:
    """Runs side by side: one row per run, one column per key (blank where a run lacks it)."""
    cols = columns(rows)
    return markdown_table(cols, [[format_value(c, row.get(c)) for c in cols] for row in rows])


def to_csv(rows: list[dict]) -> str:
    """CSV with full-precision numbers and empty cells where a run lacks a column."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buffer.getvalue()


def write_csv(rows: list[dict], path: Path | str) -> Path:
    atomic.write_text(path, to_csv(rows))
    return Path(path)


def write_markdown(rows: list[dict], path: Path | str) -> Path:
    atomic.write_text(path, to_markdown(rows))
    return Path(path)
