"""A teacher replaced by its features, extracted once: no teacher forward pass while distilling.

With ``teacher_features: cached`` the pipeline extracts the teacher's features of the un-augmented
training images (``kt-edge features``) and puts each image's index into the batch's label slot;
the student still sees augmented views, the teacher's side is looked up by index.
"""

from __future__ import annotations

import numpy as np
import torch

from kt_edge.features import FeatureStore


class CachedTeacher:
    """Callable image indices -> teacher features; like ``FrozenTeacher``, not an ``nn.Module``.

    The features live on the device in fp16, as stored (N x D x 2 bytes: 0.2 GB for CIFAR-10 at 2048-d),
    so a lookup is a gather on the device, never a copy through the host.
    """

    space = "backbone"  # the features stage extracts the backbone's pooled features

    def __init__(self, store: FeatureStore, device: torch.device):
        features = torch.from_numpy(np.concatenate([np.asarray(s) for s in store.shard_features]))
        self.features = features.to(device)
        self.device = device
        self.embed_dim = store.dim

    def __len__(self) -> int:
        return len(self.features)

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        return self.features[indices.to(self.device)].float()


def check_teacher_source(teacher, source: str) -> None:
    """A cached method must get a ``CachedTeacher`` and a live one a model: a mix-up would train on garbage."""
    if (source == "cached") != isinstance(teacher, CachedTeacher):
        raise ValueError(f"teacher_features is {source!r} but the teacher given is a {type(teacher).__name__}")


def teacher_embedding(teacher, images: torch.Tensor, targets: torch.Tensor, source: str) -> torch.Tensor:
    """The teacher's side of a batch: a forward pass on the images, or a lookup by the indices in ``targets``."""
    return teacher(targets) if source == "cached" else teacher(images)
