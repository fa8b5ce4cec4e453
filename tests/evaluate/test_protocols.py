"""Recipe-driven evaluation: every protocol on features whose answer is known, models, transfer, input errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kt_edge.errors import DataError, RecipeError
from kt_edge.evaluate.clusters import cluster_alignment
from kt_edge.evaluate.protocols import (
    evaluate_model,
    evaluate_transfer,
    run_protocols,
    transfer_splits,
)
from kt_edge.models.backbones import build_backbone
from kt_edge.recipe import DataSource, EvalConfig, check_protocols, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def _clusters(rng, n, num_classes, dim, noise):
    centers = rng.normal(size=(num_classes, dim)) * 5.0
    y = np.arange(n) % num_classes
    x = centers[y] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), y


def _cfg(**changes) -> EvalConfig:
    return EvalConfig(knn=[{"k": 20, "t": 0.07}, {"k": 1, "t": 0.07}], **changes)


def test_separable_features_score_perfectly_under_every_protocol():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, 700, 5, 16, noise=0.1)
    cfg = _cfg(protocols=["knn", "linear", "linear_10pct", "clusters"])
    result = run_protocols(x[:500], y[:500], x[500:], y[500:], cfg, map_points=50)
    assert set(result.metrics) == {
        "knn_k20_t0.07",
        "knn_k1_t0.07",
        "linear_top1",
        "linear_top5",
        "linear_10pct_top1",
        "linear_10pct_top5",
        "cluster_acc",
        "cluster_nmi",
        "cluster_ari",
    }
    for name in ("knn_k20_t0.07", "knn_k1_t0.07", "linear_top1", "linear_10pct_top1"):
        assert result.metrics[name] == 100.0, name
    # one k-means run may merge two blobs; the metrics are cluster_alignment's, accuracy in percent
    aligned = cluster_alignment(x[500:], y[500:], seed=0)
    assert result.metrics["cluster_acc"] == pytest.approx(aligned["accuracy"] * 100.0) and aligned["accuracy"] > 0.6
    assert (result.metrics["cluster_nmi"], result.metrics["cluster_ari"]) == (aligned["nmi"], aligned["ari"])
    assert all(isinstance(v, float) for v in result.metrics.values())
    np.testing.assert_array_equal(result.knn_predictions, y[500:])
    # the map sample: 50 seeded rows of the scored split, with their labels
    assert result.map_features.shape == (50, 16)
    rows = [int(np.flatnonzero((x[500:] == row).all(axis=1))[0]) for row in result.map_features]
    np.testing.assert_array_equal(result.map_labels, y[500:][rows])


def test_random_features_score_near_chance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1500, 32)).astype(np.float32)
    y = rng.integers(0, 10, size=1500)
    metrics = run_protocols(x[:1000], y[:1000], x[1000:], y[1000:], _cfg(), seed=3).metrics
    for name in ("knn_k20_t0.07", "linear_top1", "cluster_acc"):
        assert 4.0 < metrics[name] < 20.0, (name, metrics[name])
    assert metrics["cluster_nmi"] < 0.05 and abs(metrics["cluster_ari"]) < 0.02


def test_predictions_are_those_of_the_first_knn_setting():
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, 400, 4, 8, noise=6.0)  # overlapping: settings disagree
    first_k1 = run_protocols(
        x[:300],
        y[:300],
        x[300:],
        y[300:],
        EvalConfig(knn=[{"k": 1, "t": 0.07}, {"k": 50, "t": 0.1}], protocols=["knn"]),
    )
    first_k50 = run_protocols(
        x[:300],
        y[:300],
        x[300:],
        y[300:],
        EvalConfig(knn=[{"k": 50, "t": 0.1}, {"k": 1, "t": 0.07}], protocols=["knn"]),
    )
    assert first_k1.metrics == first_k50.metrics
    assert not np.array_equal(first_k1.knn_predictions, first_k50.knn_predictions)
    assert (first_k1.knn_predictions == y[300:]).mean() * 100 == pytest.approx(first_k1.metrics["knn_k1_t0.07"])
    assert first_k1.map_features is None


class Vectors(torch.utils.data.Dataset):
    """Feature vectors served as 'images', so an identity model embeds them unchanged."""

    def __init__(self, x, y, classes):
        self.x, self.y, self.classes = torch.from_numpy(x), y, classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class CountingIdentity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return x


def test_evaluate_model_embeds_once_and_matches_the_feature_path():
    rng = np.random.default_rng(4)
    x, y = _clusters(rng, 500, 5, 12, noise=3.0)
    classes = [f"c{i}" for i in range(5)]
    bank, test = Vectors(x[:400], y[:400], classes), Vectors(x[400:], y[400:], classes)
    cfg = _cfg(protocols=["knn", "linear", "clusters"])
    model = CountingIdentity()
    metrics = evaluate_model(model, bank, test, cfg, seed=0, device="cpu").metrics
    assert model.images == 500  # bank and test, each embedded once for all protocols
    assert metrics == run_protocols(x[:400], y[:400], x[400:], y[400:], cfg, num_classes=5).metrics

    model = CountingIdentity()
    detailed = evaluate_model(model, bank, test, _cfg(protocols=["clusters"]), device="cpu", map_points=30)
    assert model.images == 100  # cluster alignment needs no bank
    assert set(detailed.metrics) == {"cluster_acc", "cluster_nmi", "cluster_ari"}
    assert detailed.knn_predictions is None and len(detailed.map_labels) == 30


def test_input_problems_are_one_line_data_errors():
    rng = np.random.default_rng(5)
    x, y = _clusters(rng, 120, 3, 8, noise=0.5)
    bank, test = Vectors(x[:100], y[:100], ["a", "b", "c"]), Vectors(x[100:], y[100:], ["a", "b", "c"])
    model = CountingIdentity()
    with pytest.raises(DataError, match=r"^eval.knn k=200 exceeds the 100 images of the k-NN bank$"):
        evaluate_model(model, bank, test, EvalConfig(), device="cpu")
    assert model.images == 0  # refused before any embedding
    other = Vectors(x[100:], y[100:], ["a", "b", "dog"])
    with pytest.raises(
        DataError, match=r"^classes differ .* \(3\) .*: only in the first \[c\], only in the second \[dog\]$"
    ):
        evaluate_model(model, bank, other, _cfg(), device="cpu")
    shuffled = Vectors(x[100:], y[100:], ["b", "a", "c"])  # a label id would name another class
    with pytest.raises(DataError, match=r": the same classes in another order: class 0 is 'a' vs 'b'$"):
        evaluate_model(model, bank, shuffled, _cfg(), device="cpu")
    with pytest.raises(DataError, match="labelled test split"):
        run_protocols(x[:100], y[:100], x[100:], -np.ones(20, np.int64), _cfg())
    skewed = np.r_[np.zeros(299, np.int64), [1]]  # 1% of 300 labels over 2 classes needs 2 of class 1
    with pytest.raises(DataError, match=r"^eval protocol linear_1pct: few-label class 1 has 1 samples"):
        run_protocols(np.repeat(x[:100], 3, axis=0), skewed, x[100:], y[100:], _cfg(protocols=["linear_1pct"]))


def test_protocol_names_are_checked_in_recipes():
    check_protocols(["knn", "linear", "clusters", "linear_1pct", "linear_0.5pct", "linear_100pct"])
    for bad, message in (
        (["svm"], "unknown eval protocol 'svm'"),
        (["linear_0pct"], "must be in \\(0, 100\\]"),
        (["linear_150pct"], "must be in"),
        (["knn", "knn"], "'knn' is listed twice"),
    ):
        with pytest.raises(ValueError, match=message):
            check_protocols(bad)

    def base():  # overrides edit the mapping in place
        return {"name": "r", "data": {"train": {"path": "x"}}}

    with pytest.raises(RecipeError, match="unknown eval protocol 'svm'"):
        recipe_from_dict(base(), ["eval.protocols=[knn, svm]"])
    with pytest.raises(RecipeError, match="same \\(k, t\\) setting twice"):
        recipe_from_dict(base(), ["eval.knn=[{k: 5, t: 0.1}, {k: 5, t: 0.1}]"])
    with pytest.raises(RecipeError, match="eval.knn lists no setting"):
        recipe_from_dict(base(), ["eval.knn=[]"])
    assert recipe_from_dict(base(), ["eval.knn=[]", "eval.protocols=[linear]"]).eval.knn == []
    with pytest.raises(RecipeError, match="unknown key 'eval.linear.lr'"):
        recipe_from_dict(base(), ["eval.linear.lr=0.1"])


def test_quickstart_keeps_validating_with_the_default_protocols():
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml")
    assert recipe.eval.protocols == ["knn", "linear", "clusters"]
    assert recipe.eval.linear.normalize and recipe.eval.transfer is None


def _colour_folder(root: Path, classes: dict[str, tuple[int, int, int]], per_class: int, seed: int) -> Path:
    """An ImageFolder of noisy solid-colour 24 px images, one colour per class."""
    rng = np.random.default_rng(seed)
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, size=(24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def test_transfer_scores_another_labelled_dataset(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("alexnet", 16)
    train = _colour_folder(tmp_path / "train", COLOURS, 12, seed=0)
    test = _colour_folder(tmp_path / "test", COLOURS, 6, seed=1)
    assert evaluate_transfer(model, EvalConfig(), 16) == {}
    cfg = EvalConfig(
        knn=[{"k": 5, "t": 0.07}],
        protocols=["knn", "linear", "clusters"],
        transfer={"train": DataSource(path=train), "test": DataSource(path=test)},
    )
    metrics = evaluate_transfer(model, cfg, image_size=16, device="cpu")
    assert set(metrics) == {
        "transfer_knn_k5_t0.07",
        "transfer_linear_top1",
        "transfer_linear_top5",
        "transfer_cluster_acc",
        "transfer_cluster_nmi",
        "transfer_cluster_ari",
    }
    # colours are told apart even by random convolutions
    assert metrics["transfer_knn_k5_t0.07"] == 100.0 and metrics["transfer_linear_top1"] == 100.0
    splits = transfer_splits(cfg, image_size=16)
    assert [len(split) for split in splits] == [36, 18] and transfer_splits(EvalConfig(), 16) is None
    assert evaluate_transfer(model, cfg, image_size=16, device="cpu", splits=splits) == metrics

    cfg.transfer.test = DataSource(
        path=_colour_folder(tmp_path / "other", {"red": COLOURS["red"], "grey": (128,) * 3}, 2, seed=2)
    )
    with pytest.raises(
        DataError, match=r"classes differ between .*: only in the first \[blue, green\], only in the second \[grey\]"
    ):
        evaluate_transfer(model, cfg, image_size=16)
