"""Helpers of the transfer tests: a tiny conv backbone, a fixed batch of real sample images, a step loop, and a
reader of saved centroids."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kt_edge.data.augment import eval_transform
from kt_edge.data.sources import open_images
from kt_edge.kmeans import ClusterModel, PCAWhitening, Preprocessing
from kt_edge.models.backbones import Backbone

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "cifar10"


def tiny_backbone(dim: int = 32) -> Backbone:
    """A two-conv network behind the real ``Backbone`` interface: the methods run unchanged, in milliseconds."""
    body = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, dim, 3, stride=2, padding=1),
        nn.BatchNorm2d(dim),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Backbone("tiny", 32, body, dim)


@lru_cache(maxsize=1)
def sample_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """32 real CIFAR-10 sample images (eval view, 32 px) and their true labels."""
    images = open_images(SAMPLE / "train", subset=32, seed=0).with_transform(eval_transform(32))
    x = torch.stack([images[i][0] for i in range(len(images))])
    return x, torch.as_tensor(images.labels)


def read_centroids(path: Path) -> ClusterModel:
    """What ``save_centroids`` wrote, read as its sidecar describes it: centroids, PCA matrix, normalisation."""
    doc = json.loads(path.with_suffix(".json").read_text())
    centroids = np.load(path.with_name(doc["centroids"]))
    assert doc["format"] == "kt-edge-centroids" and centroids.shape == (doc["k"], doc["dim"])
    spec, pca = doc["preprocess"], None
    if spec["pca"] is not None:
        pca = PCAWhitening(
            np.load(path.with_name(spec["pca"]["A"])),
            np.load(path.with_name(spec["pca"]["b"])),
            spec["pca"]["eigen_power"],
        )
    return ClusterModel(centroids, Preprocessing(pca, spec["l2_normalize"]), doc["meta"])
