"""The ``kt-edge`` command line: parse, load the recipe, call one pipeline function."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path
from typing import Annotated, Callable

import typer
from rich.console import Console

from kt_edge.errors import KtEdgeError

app = typer.Typer(
    help="Distil a large self-supervised teacher into a small student and export it to NVIDIA Jetson.\n\n"
         "Typical use: kt-edge run recipes/quickstart.yaml (teacher -> distill -> eval -> export).",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
err = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
SetOpt = Annotated[list[str], typer.Option("--set", "-s", help="override a recipe key: -s distill.train.epochs=5",
                                           show_default=False)]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the last resume point of a stopped stage")]


def _friendly(func: Callable) -> Callable:
    """User errors become one red line and a non-zero exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        with warnings.catch_warnings():
            warnings.showwarning = lambda msg, *a, **k: err.print(f"[yellow]warning:[/] {msg}")
            try:
                return func(*args, **kwargs)
            except KtEdgeError as exc:
                err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None

    return wrapper


def _recipe(path: Path, overrides: list[str] | None):
    from kt_edge.recipe import load_recipe

    return load_recipe(path, overrides or [])


@app.command("run")
@_friendly
def run_cmd(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False):
    """Run every stage: train (or import) the teacher, distil, evaluate, export and verify the bundle."""
    from kt_edge import pipeline

    pipeline.run_all(_recipe(recipe, set_), resume)


@app.command("train-teacher")
@_friendly
def train_teacher_cmd(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False):
    """Train the teacher with its self-supervised method, or import teacher.checkpoint."""
    from kt_edge import pipeline

    pipeline.train_teacher(_recipe(recipe, set_), resume)


@app.command("distill")
@_friendly
def distill_cmd(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False):
    """Distil the run's teacher into the student with distill.method."""
    from kt_edge import pipeline

    pipeline.distill(_recipe(recipe, set_), resume)


@app.command("eval")
@_friendly
def eval_cmd(recipe: RecipeArg, set_: SetOpt = None):
    """Score teacher, student and a random-init student by weighted k-NN on data.test."""
    from kt_edge import pipeline

    pipeline.evaluate(_recipe(recipe, set_))


@app.command("export")
@_friendly
def export_cmd(recipe: RecipeArg, set_: SetOpt = None):
    """Write the device bundle (ONNX, golden vectors, manifest) and check it against PyTorch."""
    from kt_edge import pipeline

    pipeline.export(_recipe(recipe, set_))


@app.command("check")
@_friendly
def check_cmd(recipe: RecipeArg, set_: SetOpt = None):
    """Validate a recipe (with overrides) and print it resolved; runs nothing."""
    typer.echo(_recipe(recipe, set_).to_yaml(), nl=False)


@app.command("methods")
def methods_cmd():
    """List teacher and distillation methods with their options and defaults."""
    from kt_edge.teachers import TEACHERS
    from kt_edge.transfer import DISTILLERS

    for section, registry in (("teacher", TEACHERS), ("distill", DISTILLERS)):
        for name, method in sorted(registry.items()):
            typer.echo(f"{section}.method: {name}  ({(method.__doc__ or '').strip().splitlines()[0]})")
            for key, value in method.Options().model_dump().items():
                typer.echo(f"    {section}.options.{key} = {value}")
