"""Cluster transfer (Noroozi et al., CVPR 2018; ClusterFit): train the student to classify pseudo-labels.

The teacher's knowledge arrives as labels, not as features: ``kt-edge cluster`` runs k-means on
the teacher's features and gives every image its nearest centroid. The student, from scratch,
plus a linear classifier, then learns those labels with cross-entropy. The teacher is not run
during training. With ``balanced`` every training sample first draws a cluster uniformly, then
an image of it (DeepCluster's uniform sampler), so large clusters do not dominate.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from kt_edge.data.augment import crop_flip
from kt_edge.data.sources import Images
from kt_edge.engine.method import Needs
from kt_edge.models.backbones import Backbone


class ClusterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    balanced: bool = False  # sample uniformly over clusters instead of over images


class ClusterTransfer(nn.Module):
    """Cluster transfer: the student classifies the teacher's k-means pseudo-labels (cross-entropy)."""

    Options = ClusterOptions

    def __init__(self, student: Backbone, teacher, options: dict, n_images: int, n_classes: int):
        super().__init__()
        self.opts = ClusterOptions(**options)
        if not 2 <= n_classes <= n_images:
            raise ValueError(f"cluster transfer needs 2..{n_images} pseudo-classes, got {n_classes}")
        self.backbone = student
        self.classifier = nn.Linear(student.embed_dim, n_classes)

    @staticmethod
    def needs(options: dict) -> Needs:
        return Needs.PSEUDO_LABELS

    @staticmethod
    def training_set(images: Images, labels: np.ndarray, options: dict) -> Images:
        """``images`` labelled by their pseudo-labels, cluster-balanced when the options ask for it."""
        labelled = images.with_labels(labels)
        return ClusterBalanced(labelled) if ClusterOptions(**options).balanced else labelled

    @staticmethod
    def train_transform(image_size: int):
        """DeepCluster's training augmentation, random resized crop and flip; the crop keeps at least 20% of
        the image (MoCo v2's bound) rather than 8%, which leaves little of a 32 px image."""
        return crop_flip(image_size, scale=(0.2, 1.0))

    def training_step(self, batch):
        images, labels = batch  # B x 3 x S x S, pseudo-labels B
        logits = self.classifier(self.backbone(images)).float()  # B x clusters
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "accuracy": (logits.argmax(1) == labels).float().mean()}

    def after_step(self, step: int, total: int) -> None:
        """Nothing moves after the optimiser's step: no momentum encoder, no queue."""


class ClusterBalanced(Images):
    """Each item draws a non-empty cluster uniformly, then one of its images, from torch's global RNG.

    The trainer seeds that RNG from (seed, epoch, index) around every sample, so the draw changes
    each epoch yet is reproducible and resume-safe; an epoch keeps the dataset's length. It has no
    pixel array, so ``data.augment: auto`` trains it on the per-sample path (batched reads rows directly).
    """

    def __init__(self, base: Images):
        super().__init__(base.labels, base.classes, base.name)
        self.base = base
        order = np.argsort(base.labels, kind="stable")
        _, starts = np.unique(base.labels[order], return_index=True)
        self.members = [torch.from_numpy(m) for m in np.split(order, starts[1:])]

    def image(self, index: int):
        return self.base.image(index)

    def __getitem__(self, index: int):
        members = self.members[int(torch.randint(len(self.members), ()))]
        chosen = int(members[int(torch.randint(len(members), ()))])
        return super().__getitem__(chosen)
