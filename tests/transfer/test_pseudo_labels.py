"""Cluster transfer: the student classifies k-means pseudo-labels of real images; the cluster-balanced set."""

import numpy as np
import pytest
import torch
from sample_kit import train_steps
from transfer_kit import sample_batch, tiny_backbone

from kt_edge.data.feed import SeededViews
from kt_edge.data.sources import ArrayImages
from kt_edge.engine.method import Needs
from kt_edge.features import embed
from kt_edge.kmeans import fit_clusters
from kt_edge.transfer.pseudo_labels import ClusterBalanced, ClusterTransfer


def test_loss_falls_on_real_images_with_teacher_pseudo_labels():
    x, _ = sample_batch()
    torch.manual_seed(1)
    teacher = tiny_backbone(48)
    feats, _ = embed(teacher, torch.utils.data.TensorDataset(x, torch.zeros(len(x))), progress=False)
    model, _ = fit_clusters(feats, 4, seed=0, use_gpu=False)
    pseudo, _ = model.assign(feats)
    assert len(np.unique(pseudo)) > 1
    torch.manual_seed(0)
    method = ClusterTransfer(tiny_backbone(), None, {}, n_images=len(x), n_classes=4)
    assert method.classifier.out_features == 4 and ClusterTransfer.needs({}) is Needs.PSEUDO_LABELS
    losses = train_steps(method, (x, torch.from_numpy(pseudo)), steps=8, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
    assert method.training_step((x, torch.from_numpy(pseudo)))["accuracy"] > 0.5


def test_more_classes_than_images_is_refused():
    with pytest.raises(ValueError, match="2..10 pseudo-classes, got 11"):
        ClusterTransfer(tiny_backbone(), None, {}, n_images=10, n_classes=11)


def indexed_images(labels):
    """Images whose pixels hold their own index, so a drawn item tells which image it came from."""
    array = np.zeros((len(labels), 2, 2, 3), dtype=np.uint8)
    array[:, 0, 0, 0] = np.arange(len(labels))
    return ArrayImages(array, np.full(len(labels), -1), [], "indexed")


def test_balanced_set_draws_clusters_uniformly_and_reproducibly():
    labels = np.array([0] * 90 + [1] * 8 + [5] * 2)  # skewed; cluster ids need not be contiguous
    images = indexed_images(labels)
    plain = ClusterTransfer.training_set(images, labels, {"balanced": False})
    assert not isinstance(plain, ClusterBalanced) and plain.labels.tolist() == labels.tolist()
    balanced = ClusterTransfer.training_set(images, labels, {"balanced": True})
    assert isinstance(balanced, ClusterBalanced) and len(balanced) == 100
    views = SeededViews(balanced.with_transform(lambda im: int(np.asarray(im)[0, 0, 0])), seed=3)
    drawn = []
    for epoch in range(6):
        drawn += [views[epoch, i] for i in range(100)]
    for index, label in drawn:
        assert labels[index] == label  # the label travels with the drawn image
    counts = np.bincount([label for _, label in drawn], minlength=6)[[0, 1, 5]]
    assert counts.sum() == 600 and np.all(np.abs(counts / 600 - 1 / 3) < 0.07), counts
    assert len({index for index, label in drawn if label == 5}) == 2
    # the trainer's seeding makes each draw a function of (seed, epoch, index)
    assert [views[2, i] for i in range(100)] == drawn[200:300]
    assert drawn[:100] != drawn[100:200]
