"""Score a model's frozen embeddings with every protocol a recipe asks for, embedding each split once.

Protocols (``eval.protocols``) and the metrics they add, accuracies in percent:

- ``knn``: weighted k-NN per ``eval.knn`` setting -> ``knn_k200_t0.1``, ...
- ``linear``: linear probe on all bank labels -> ``linear_top1``, ``linear_top5``
- ``linear_<P>pct``: probe on a class-balanced P% of the bank labels -> ``linear_<P>pct_top1``, ``..._top5``
- ``clusters``: k-means of the scored split, K = its class count -> ``cluster_acc`` (%),
  ``cluster_nmi`` and ``cluster_ari`` (0..1)

The bank (a train split) builds the k-NN index and fits the probes; the test split is scored.
Transfer runs the same protocols on a labelled dataset not used for training, prefixing ``transfer_``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kt_edge.data.labelled import class_mismatch, labelled_pair
from kt_edge.data.sources import Images
from kt_edge.errors import DataError
from kt_edge.evaluate.clusters import cluster_alignment
from kt_edge.evaluate.knn import KnnSetting, knn_classify
from kt_edge.evaluate.linear import WEIGHT_DECAYS, few_label_probe, linear_probe
from kt_edge.features import embed, resolve_device
from kt_edge.recipe import PROTOCOL, EvalConfig

TRANSFER_PREFIX = "transfer_"


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model, plus what a report draws: the first k-NN setting's predictions and a map sample."""

    metrics: dict[str, float]
    test_labels: np.ndarray
    knn_predictions: np.ndarray | None  # first eval.knn setting on the scored split; None without 'knn'
    map_features: np.ndarray | None  # seeded sample of scored-split features for a 2-D map
    map_labels: np.ndarray | None


def _knn_settings(cfg: EvalConfig) -> tuple[KnnSetting, ...]:
    """The recipe's k-NN settings, in recipe order (the first is the headline one)."""
    return tuple(KnnSetting(s.k, s.t) for s in cfg.knn)


def _needs_bank(protocols: list[str]) -> bool:
    return any(p != "clusters" for p in protocols)


def _check_sizes(cfg: EvalConfig, bank_size: int) -> None:
    """Refuse a k-NN setting the bank cannot fill before anything is embedded."""
    if "knn" in cfg.protocols:
        largest = max(s.k for s in cfg.knn)
        if largest > bank_size:
            raise DataError(f"eval.knn k={largest} exceeds the {bank_size} images of the k-NN bank")


def run_protocols(
    bank_x: np.ndarray | None,
    bank_y: np.ndarray | None,
    test_x: np.ndarray,
    test_y: np.ndarray,
    cfg: EvalConfig,
    seed: int = 0,
    device: str = "cpu",
    num_classes: int | None = None,
    map_points: int = 0,
) -> Evaluation:
    """Every protocol of ``cfg`` (an EvalConfig) on features already computed; input problems raise DataError."""
    test_y = np.asarray(test_y)
    if test_y.size == 0 or test_y.min() < 0:
        raise DataError("evaluation needs a non-empty labelled test split (every label >= 0)")
    if _needs_bank(cfg.protocols):
        if bank_y is None or len(bank_y) == 0 or np.asarray(bank_y).min() < 0:
            raise DataError("evaluation needs a non-empty labelled bank split (every label >= 0)")
        _check_sizes(cfg, len(bank_y))
    probe = {
        "normalize": cfg.linear.normalize,
        "weight_decay": WEIGHT_DECAYS if cfg.linear.weight_decay is None else cfg.linear.weight_decay,
        "max_iter": cfg.linear.max_iter,
        "device": device,
    }
    if num_classes is None and bank_y is not None:
        num_classes = int(max(np.max(bank_y), test_y.max())) + 1
    metrics: dict[str, float] = {}
    predictions = None
    for protocol in cfg.protocols:
        try:
            if protocol == "knn":
                settings = _knn_settings(cfg)
                preds = knn_classify(bank_x, bank_y, test_x, settings, num_classes)
                metrics.update({s.name: float((preds[s] == test_y).mean() * 100.0) for s in settings})
                predictions = preds[settings[0]]
            elif protocol == "linear":
                result = linear_probe(bank_x, bank_y, test_x, test_y, num_classes=num_classes, seed=seed, **probe)
                metrics.update(linear_top1=result.top1, linear_top5=result.top5)
            elif protocol == "clusters":
                aligned = cluster_alignment(test_x, test_y, seed=seed)
                metrics.update(
                    cluster_acc=aligned["accuracy"] * 100.0, cluster_nmi=aligned["nmi"], cluster_ari=aligned["ari"]
                )
            else:
                fraction = float(PROTOCOL.fullmatch(protocol).group(1)) / 100.0
                result = few_label_probe(
                    bank_x, bank_y, test_x, test_y, fraction, seed, num_classes=num_classes, **probe
                )
                metrics.update({f"{protocol}_top1": result.top1, f"{protocol}_top5": result.top5})
        except ValueError as exc:
            raise DataError(f"eval protocol {protocol}: {exc}") from None
    map_features = map_labels = None
    if map_points > 0:
        keep = np.arange(len(test_y))
        if len(keep) > map_points:
            keep = np.sort(np.random.default_rng(seed).choice(len(keep), map_points, replace=False))
        map_features, map_labels = np.asarray(test_x)[keep], test_y[keep]
    return Evaluation(metrics, test_y, predictions, map_features, map_labels)


def _classes(dataset) -> list[str] | None:
    return getattr(dataset, "classes", None)


def evaluate_model(
    model: torch.nn.Module,
    bank_set,
    test_set,
    cfg: EvalConfig,
    seed: int = 0,
    device: str | torch.device | None = None,
    workers: int = 0,
    map_points: int = 0,
) -> Evaluation:
    """Embed the bank (when a protocol needs it) and the test split once, then run every protocol of ``cfg``."""
    bank_classes, test_classes = _classes(bank_set), _classes(test_set)
    if bank_classes is not None and test_classes is not None:
        mismatch = class_mismatch("the bank", bank_classes, "the test split", test_classes)
        if mismatch:
            raise DataError(mismatch)
    needs_bank = _needs_bank(cfg.protocols)
    if needs_bank:
        _check_sizes(cfg, len(bank_set))
    device = resolve_device(device)
    bank_x = bank_y = None
    if needs_bank:
        bank_x, bank_y = embed(model, bank_set, device=device, workers=workers, progress=False)
    test_x, test_y = embed(model, test_set, device=device, workers=workers, progress=False)
    num_classes = len(test_classes) if test_classes else None
    return run_protocols(bank_x, bank_y, test_x, test_y, cfg, seed, str(device), num_classes, map_points)


def transfer_splits(cfg: EvalConfig, image_size: int, seed: int = 0) -> tuple[Images, Images] | None:
    """The (bank, scored) splits of ``cfg.transfer``, opened once for all models; None when it is not set."""
    if cfg.transfer is None:
        return None
    return labelled_pair(cfg.transfer.train, cfg.transfer.test, image_size, seed)


def evaluate_transfer(
    model: torch.nn.Module,
    cfg: EvalConfig,
    image_size: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    workers: int = 0,
    splits: tuple[Images, Images] | None = None,
) -> dict[str, float]:
    """The same protocols on ``cfg.transfer`` (train = bank, test = scored), metric names prefixed 'transfer_'.

    Empty when the recipe sets no transfer dataset. Pass ``splits`` from `transfer_splits` when
    scoring several models, so the folders are opened and checked once.
    """
    if cfg.transfer is None:
        return {}
    bank_set, test_set = splits or transfer_splits(cfg, image_size, seed)
    metrics = evaluate_model(model, bank_set, test_set, cfg, seed, device, workers).metrics
    return {TRANSFER_PREFIX + name: value for name, value in metrics.items()}
