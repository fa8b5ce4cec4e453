"""The ``kt-edge`` command line: parse, load the recipe, call one stage function."""

from __future__ import annotations

import errno
import functools
import logging
import signal
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator

import typer
from rich.console import Console
from rich.text import Text

from kt_edge.errors import Interrupted, KtEdgeError

app = typer.Typer(
    help="Distil a large self-supervised teacher into a small student and export it to NVIDIA Jetson.\n\n"
    "Typical use: kt-edge run recipes/quickstart.yaml (teacher -> distill -> eval -> export).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
SetOpt = Annotated[
    list[str], typer.Option("--set", "-s", help="override a recipe key: -s distill.train.epochs=5", show_default=False)
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the last resume point of a stopped stage")]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _say(kind: str, style: str, message) -> None:
    """One line on stderr, as plain text: brackets in a path or a list of keys are never taken for markup."""
    err.print(Text.assemble((f"{kind}:", style), " ", str(message)), highlight=False, soft_wrap=True)


def _stopped(signum: int, _frame=None) -> None:
    """SIGTERM (and Ctrl-C) outside a training loop, which handles them itself: stop with one line.

    Later ones are ignored while the stage winds down: a scheduler signals the process and then its
    whole group, and a second stop raised inside the clean-up would print a traceback."""
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass
    name = signal.Signals(signum).name
    raise Interrupted(
        f"stopped by {name}; finished work (whole artifacts, feature shards) is kept: run the same "
        "command again to go on"
    )


def _friendly(func: Callable) -> Callable:
    """User errors become one red line and a non-zero exit code instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("kt_edge").setLevel(logging.INFO)
        try:
            previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            signal.signal(signal.SIGTERM, _stopped)
        except ValueError:  # not the main thread: signals stay as they are
            previous = {}
        with warnings.catch_warnings():
            warnings.showwarning = lambda msg, *a, **k: _say("warning", "yellow", msg)
            try:
                try:
                    return func(*args, **kwargs)
                except KeyboardInterrupt:
                    _stopped(signal.SIGINT)
            except KtEdgeError as exc:
                _say("error", "bold red", exc)
                raise typer.Exit(exc.exit_code) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                _say(
                    "error",
                    "bold red",
                    f"out of disk space ({exc.strerror}); nothing partial was kept: "
                    "free space and run the same command again (with --resume for training)",
                )
                raise typer.Exit(1) from None
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return wrapper


def _recipe(path: Path, overrides: list[str] | None):
    from kt_edge.recipe import load_recipe

    return load_recipe(path, overrides or [])


@contextmanager
def _locked_recipe(path: Path, overrides: list[str] | None, command: str) -> Iterator:
    """The recipe of a command that works in its run directory, which it holds for its whole life (a second
    command there is refused); the run's recipe.yaml becomes this recipe only if the command succeeds."""
    from kt_edge.run_lock import hold
    from kt_edge.stages.inputs import record_recipe

    recipe = _recipe(path, overrides)
    with hold(recipe.run_dir, command):
        yield recipe
        record_recipe(recipe)


@app.command("run")
@_friendly
def run_cmd(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False):
    """Run every stage: train (or import) the teacher, distil, evaluate, export and verify the bundle."""
    from kt_edge.stages.run import run_all

    with _locked_recipe(recipe, set_, "run") as loaded:
        run_all(loaded, resume)


@app.command("train-teacher")
@_friendly
def train_teacher_cmd(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False):
    """Train the teacher with its self-supervised method, or import teacher.checkpoint."""
    from kt_edge.stages.run import teacher

    with _locked_recipe(recipe, set_, "train-teacher") as loaded:
        teacher(loaded, resume)


class Split(str, Enum):
    """A labelled data split of the recipe: data.train or data.test."""

    train = "train"
    test = "test"


@app.command("features")
@_friendly
def features_cmd(
    recipe: RecipeArg,
    split: Annotated[Split, typer.Option(help="which data split to embed")] = Split.train,
    set_: SetOpt = None,
):
    """Extract the run teacher's features of a split to runs/<name>/features/<split>/ (resumes finished shards)."""
    from kt_edge.stages.run import features

    with _locked_recipe(recipe, set_, "features") as loaded:
        features(loaded, split.value)


@app.command("cluster")
@_friendly
def cluster_cmd(recipe: RecipeArg, set_: SetOpt = None):
    """k-means on the teacher's features (recipe section cluster); save centroids, pseudo-labels and a report."""
    from kt_edge.stages.run import clusters

    with _locked_recipe(recipe, set_, "cluster") as loaded:
        clusters(loaded)


@app.command("distill")
@_friendly
def distill_cmd(recipe: RecipeArg, set_: SetOpt = None, resume: ResumeOpt = False):
    """Distil the run's teacher into the student with distill.method; the teacher's features or clusters are
    made first when the method needs them."""
    from kt_edge.stages.run import student

    with _locked_recipe(recipe, set_, "distill") as loaded:
        student(loaded, resume)


@app.command("eval")
@_friendly
def eval_cmd(recipe: RecipeArg, set_: SetOpt = None):
    """Score teacher, student and a random-init student on data.test with every eval.protocols entry: weighted
    k-NN (each eval.knn setting), linear probe, few-label probes, cluster alignment, and eval.transfer."""
    from kt_edge.stages.run import evaluation

    with _locked_recipe(recipe, set_, "eval") as loaded:
        evaluation(loaded)


@app.command("export")
@_friendly
def export_cmd(recipe: RecipeArg, set_: SetOpt = None):
    """Write the device bundle (ONNX, golden vectors, manifest) and check it against PyTorch."""
    from kt_edge.stages.run import bundle

    with _locked_recipe(recipe, set_, "export") as loaded:
        bundle(loaded)


data_app = typer.Typer(help="Prepare data for fast training.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("cache")
@_friendly
def data_cache_cmd(
    recipe: RecipeArg,
    split: Annotated[Split, typer.Option(help="which data split to decode")] = Split.train,
    set_: SetOpt = None,
):
    """Decode a split once into a uint8 array at data.image_size (resumable); train on it with data.cache: true."""
    from kt_edge.stages.inputs import cache_data

    cache_data(_recipe(recipe, set_), split.value)


@app.command("report")
@_friendly
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run directory, e.g. runs/quickstart", show_default=False)],
    map_points: Annotated[int, typer.Option(min=0, help="test images on the 2-D map (0: no map)")] = 1000,
):
    """Write RUN_DIR/report.html (curves, metrics, 2-D map, confusion matrix, parity) and report.md."""
    from kt_edge.evaluate.report import write_report

    html, md = write_report(run_dir, map_points=map_points)
    typer.echo(f"wrote {html} and {md}")


@app.command("compare")
@_friendly
def compare_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories", show_default=False)],
    csv: Annotated[Path | None, typer.Option(help="also write the table as CSV here")] = None,
    md: Annotated[Path | None, typer.Option(help="also write the table as markdown here")] = None,
):
    """One side-by-side table of runs: teacher, method, student, every metric, export parity, latency."""
    from kt_edge.evaluate.compare import compare_runs, to_markdown, write_csv, write_markdown

    rows = compare_runs(run_dirs)
    typer.echo(to_markdown(rows))
    if csv:
        write_csv(rows, csv)
    if md:
        write_markdown(rows, md)


@app.command("check")
@_friendly
def check_cmd(recipe: RecipeArg, set_: SetOpt = None):
    """Validate a recipe (with overrides) and print it resolved; runs nothing."""
    typer.echo(_recipe(recipe, set_).to_yaml(), nl=False)


@app.command("methods")
def methods_cmd():
    """List the students, and teacher and distillation methods with their options and defaults."""
    from kt_edge.models.backbones import STUDENTS
    from kt_edge.teachers import TEACHERS
    from kt_edge.transfer import DISTILLERS

    typer.echo(f"distill.student: {', '.join(STUDENTS)}")

    for section, registry in (("teacher", TEACHERS), ("distill", DISTILLERS)):
        for name, method in sorted(registry.items()):
            typer.echo(f"{section}.method: {name}  ({(method.__doc__ or '').strip().splitlines()[0]})")
            for key, value in method.Options().model_dump().items():
                typer.echo(f"    {section}.options.{key} = {value}")
    typer.echo(
        "distill.method may also be any teacher method: the student then trains alone, with no teacher "
        "(the baseline distillation must beat)"
    )
