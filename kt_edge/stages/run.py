"""`kt-edge run`: every stage a recipe needs, in order, then the summary tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kt_edge.engine import distributed
from kt_edge.engine.method import Needs
from kt_edge.recipe import Recipe
from kt_edge.stages.cluster import cluster_stage
from kt_edge.stages.distill import distill
from kt_edge.stages.evaluate import evaluate
from kt_edge.stages.export import export
from kt_edge.stages.features import features_stage
from kt_edge.stages.inputs import distill_needs
from kt_edge.stages.teacher import train_teacher


def run_stages(recipe: Recipe, resume: bool = False, export_bundle: bool = True) -> tuple[dict, dict | None] | None:
    """teacher -> [features -> cluster, when distill.method needs them] -> distill -> eval -> export; returns
    the evaluation results and the export report (None without ``export_bundle``, and None altogether on the
    ranks other than 0 under torchrun).  A student trained alone (distill.method a teacher method) skips the
    teacher."""
    needs = distill_needs(recipe)
    if needs is not Needs.NOTHING:
        train_teacher(recipe, resume)
    if needs is Needs.PSEUDO_LABELS:
        cluster_stage(recipe)  # extracts the teacher's features first
    elif needs is Needs.FEATURES:
        features_stage(recipe, "train")
    distill(recipe, resume)
    if not distributed.is_main():  # under torchrun, evaluation and export are rank 0's
        return None
    return evaluate(recipe), export(recipe) if export_bundle else None


def run_all(recipe: Recipe, resume: bool = False) -> None:
    """Every stage, then the summary tables."""
    done = run_stages(recipe, resume)
    if done is None:
        return
    results, report = done
    metrics = list(dict.fromkeys(metric for row in results.values() for metric in row))
    table = Table(title=f"kt-edge run {recipe.name}: evaluation on {recipe.data.test.path}")
    table.add_column("metric")
    for name in results:
        table.add_column(name.replace("_", "-"), justify="right")
    for metric in metrics:
        table.add_row(metric, *(f"{row[metric]:.2f}" if metric in row else "" for row in results.values()))
    Console().print(table)
    parity = Table(title="export parity (ONNX Runtime vs PyTorch fp32)")
    for column in ("precision", "test images", "min cosine", "1st percentile", "k-NN top-1 drop", "verdict"):
        parity.add_column(column)
    for precision, res in report["results"].items():
        cosine = res["split"]["cosine"]
        parity.add_row(
            precision,
            str(cosine["images"]),
            f"{cosine['min']:.6f}",
            f"{cosine['p1']:.6f}",
            f"{res['accuracy']['drop']:+.2f}",
            "PASS" if res["passed"] else "FAIL",
        )
    Console().print(parity)
    Console().print(f"bundle: {report['bundle']}")
