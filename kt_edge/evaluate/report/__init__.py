"""One self-contained HTML report of a run (images inlined), and a markdown summary beside it.

Needs only the run directory and the data its recipe names: training curves come from
``metrics.jsonl``, the evaluation table from ``eval/results.json``, export parity and latency from
``bundle/``; the 2-D map and the per-class k-NN view are recomputed on the CPU from the saved
teacher and student on a capped, seeded part of the data. A stage that is absent is reported as
missing, never as a crash.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from kt_edge import atomic
from kt_edge.errors import DataError
from kt_edge.evaluate.compare import read_recipe
from kt_edge.evaluate.report.render import render_html, render_md
from kt_edge.evaluate.report.sections import (
    evaluation,
    export,
    latency,
    map_view,
    per_class,
    recompute,
    summary,
    training,
)
from kt_edge.run_dir import RunDir


def write_report(
    run_dir: Path | str,
    *,
    map_points: int = 1000,
    max_bank: int = 5000,
    max_test: int = 1000,
    device: str = "cpu",
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into the run directory and return their paths.

    ``max_bank`` / ``max_test`` cap the seeded parts of the recipe's train / test splits embedded
    again for the map and the per-class view; ``map_points`` caps the points of each map.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory not found: {run_dir}")
    if map_points < 0 or max_bank < 1 or max_test < 1:
        raise ValueError(f"need map_points >= 0 and max_bank, max_test >= 1, got {map_points}, {max_bank}, {max_test}")
    recipe = read_recipe(run_dir)
    seed = recipe.get("seed", 0) if isinstance(recipe.get("seed", 0), int) else 0
    views = (
        recompute(run_dir, recipe, seed, max_bank, max_test, map_points, device)
        if recipe
        else "no recipe.yaml in the run directory"
    )
    sections = [
        summary(run_dir, recipe),
        training(run_dir),
        evaluation(run_dir),
        map_view(views, seed, map_points),
        per_class(views),
        export(run_dir),
        latency(run_dir),
    ]
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    html_path, md_path = RunDir(run_dir).report_html, RunDir(run_dir).report_md
    atomic.write_text(html_path, render_html(run_dir.name, created, sections))
    atomic.write_text(md_path, render_md(run_dir.name, created, sections))
    return html_path, md_path
