"""`kt-edge features`, `kt-edge cluster` and distillation that needs them, on a tiny run of the sample.

The teacher is a random-init AlexNet checkpoint written for the recipe (its clusters are poor, but
every artifact is real); pseudo-labels go to a second dataset, the sample's test split.
"""

import json

import numpy as np
import pytest
import torch
import yaml
from sample_kit import SAMPLE, tiny_recipe_dict
from transfer_kit import read_centroids
from typer.testing import CliRunner

from kt_edge.cli import app
from kt_edge.engine.method import Needs
from kt_edge.features import FeatureStore
from kt_edge.models.backbones import build_backbone
from kt_edge.models.checkpoint import read_sidecar, save_backbone
from kt_edge.recipe import load_recipe, recipe_from_dict
from kt_edge.stages import stamp
from kt_edge.stages.inputs import distill_needs, student_inputs, teacher_inputs

runner = CliRunner()
K = 6


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def recipe_dict(root, **sections):
    data = tiny_recipe_dict(
        root / "runs",
        teacher={"arch": "alexnet"},
        distill={
            "method": "cluster",
            "options": {"balanced": True},
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 16, "lr": 0.05, "log_every": 1},
        },
        **sections,
    )
    data["data"]["train"]["subset"] = 96
    data["data"]["test"]["subset"] = 40
    data["data"]["image_size"] = 16  # the smallest size a recipe takes: a quarter of the compute of 32 px
    data["cluster"] = {"k": K, "use_gpu": False, "assign_to": {"path": str(SAMPLE / "test"), "subset": 48}}
    return data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A recipe with a random-init teacher in place, then `features` (both splits) and `cluster` through the CLI."""
    root = tmp_path_factory.mktemp("stages")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(root)))
    recipe = load_recipe(path)
    torch.manual_seed(0)
    save_backbone(
        build_backbone("alexnet", 16),
        recipe.run_dir / "teacher",
        stage="teacher",
        method="random-init",
    )
    stamp.write(recipe.run_dir / "teacher", teacher_inputs(recipe))
    outputs = {
        "features": invoke("features", path),
        "features-test": invoke("features", path, "--split", "test"),
        "cluster": invoke("cluster", path),
    }
    return path, recipe.run_dir, outputs


def test_features_and_cluster_write_their_artifacts(run):
    path, run_dir, outputs = run
    for name, result in outputs.items():
        assert result.exit_code == 0, f"{name}: {result.output}"
    train, test = FeatureStore.open(run_dir / "features" / "train"), FeatureStore.open(run_dir / "features" / "test")
    assert (train.n, train.dim, test.n, test.dim) == (96, 256, 40, 256)
    assert train.fingerprint != test.fingerprint
    assert set(np.unique(train.labels)) <= set(range(10)) and train.labels.min() >= 0  # true labels kept
    centroids = read_centroids(run_dir / "clusters" / "centroids.npy")
    assert centroids.centroids.shape == (K, 256) and centroids.meta["features_fingerprint"] == train.fingerprint
    report = json.loads((run_dir / "clusters" / "report.json").read_text())
    assert report["k"] == K and report["pseudo_labels_of"] == "cluster.assign_to"
    assert set(report["sets"]) == {"data.train", "cluster.assign_to"}
    for name, n in (("data.train", 96), ("cluster.assign_to", 48)):
        rep = report["sets"][name]
        assert rep["n"] == n and rep["labelled"] == n and 0 <= rep["nmi"] <= 1 and 0 <= rep["hungarian_accuracy"] <= 1
        assert sum(rep["size_histogram"]["counts"]) == K - rep["empty_clusters"]
    assert "clusters" in outputs["cluster"].output and "NMI" in outputs["cluster"].output
    for folder in ("features/train", "features/test", "features/assign_to", "clusters"):
        assert stamp.read(run_dir / folder), f"{folder} has no done stamp"


def test_pseudo_labels_of_the_second_dataset_are_its_nearest_centroids(run):
    _, run_dir, _ = run
    pseudo = np.load(run_dir / "clusters" / "pseudo_labels.npy")
    assert pseudo.dtype == np.int64 and pseudo.shape == (48,) and 0 <= pseudo.min() and pseudo.max() < K
    other = FeatureStore.open(run_dir / "features" / "assign_to")
    assert other.n == 48
    centroids = read_centroids(run_dir / "clusters" / "centroids.npy")
    x = centroids.preprocess(other.to_array())
    nearest = ((x[:, None, :] - centroids.centroids[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == pseudo).mean() >= 0.95  # faiss and numpy may split a near-tie differently


def test_finished_stages_are_not_redone(run):
    path, run_dir, _ = run
    labels = run_dir / "clusters" / "pseudo_labels.npy"
    shard = run_dir / "features" / "train" / "shard-00000.npy"
    before = labels.stat().st_mtime_ns, shard.stat().st_mtime_ns
    result = invoke("cluster", path)
    assert result.exit_code == 0 and "up to date" in result.output
    assert (labels.stat().st_mtime_ns, shard.stat().st_mtime_ns) == before


def test_distill_cluster_trains_on_the_pseudo_labelled_set(run):
    path, run_dir, _ = run
    result = invoke("distill", path)
    assert result.exit_code == 0, result.output
    card = read_sidecar(run_dir / "student")
    assert card["method"] == "cluster" and card["steps"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    distill = [r for r in records if r["stage"] == "distill"]
    assert len(distill) == 2 and all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in distill)


def test_distill_with_cached_teacher_features(run):
    path, run_dir, _ = run
    result = invoke(
        "distill", path, "-s", "distill.method=regress", "-s", "distill.options={teacher_features: cached, hidden: 32}"
    )
    assert result.exit_code == 0, result.output
    card = read_sidecar(run_dir / "student")
    assert card["method"] == "regress" and card["steps"] == 2


def test_user_errors_are_one_line(run, tmp_path):
    path, _, _ = run
    result = invoke("cluster", path, "-s", "cluster.k=500")
    assert result.exit_code == 2 and "cluster.k 500 is more than the 96 images" in result.output
    result = invoke("distill", path, "-s", "distill.method=compress", "-s", "distill.options={}")
    assert result.exit_code == 2 and "distill.options.bank 128000 is not smaller than the 96" in result.output
    result = invoke("features", path, "--split", "test", "-s", "name=other")
    assert result.exit_code == 2 and "run `kt-edge train-teacher` first" in result.output
    result = invoke("features", path, "--split", "valid")
    assert result.exit_code != 0 and "train" in result.output


def test_what_distill_needs_decides_the_extra_stages(tmp_path):
    base = recipe_dict(tmp_path)
    cluster = recipe_from_dict(base)
    seed = recipe_from_dict(base, ["distill.method=seed", "distill.options={queue: 32}"])
    cached = recipe_from_dict(base, ["distill.method=compress", "distill.options={teacher_features: cached}"])
    assert (distill_needs(cluster), distill_needs(seed), distill_needs(cached)) == (
        Needs.PSEUDO_LABELS,
        Needs.TEACHER,
        Needs.FEATURES,
    )
    # the cluster section is an input of the student only when the student learns pseudo-labels
    assert student_inputs(cluster) != student_inputs(recipe_from_dict(base, ["cluster.k=7"]))
    assert student_inputs(seed) == student_inputs(
        recipe_from_dict(base, ["distill.method=seed", "distill.options={queue: 32}", "cluster.k=7"])
    )
