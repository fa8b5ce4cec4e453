"""The contract of a method (a teacher's pretext task or a distillation), and what it needs before it trains.

A method is one file: an ``nn.Module`` with an ``Options`` model (its recipe options), the network it
hands on (``backbone``), its training views (``train_transform``), one step's scalars with a ``loss``
(``training_step``), and what it updates once the optimiser has stepped (``after_step``: momentum
encoders, queues). Registering it in ``kt_edge.teachers`` or ``kt_edge.transfer`` is the only other line
a new method needs: the recipe, ``kt-edge methods``, the stages and the conformance tests find it there.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn


class Needs(str, Enum):
    """What the distill stage prepares for a method before it trains."""

    NOTHING = "nothing"  # a teacher method: the student trains alone (the baseline)
    TEACHER = "teacher"  # the frozen teacher network, run on every batch
    FEATURES = "features"  # the teacher's features of the training set, extracted once; batches carry indices
    PSEUDO_LABELS = "pseudo_labels"  # the cluster stage's labels; the teacher is not run while training


@runtime_checkable
class Method(Protocol):
    Options: ClassVar[type[BaseModel]]
    backbone: nn.Module

    def train_transform(self, image_size: int) -> Callable[[Any], Any]: ...

    def training_step(self, batch) -> dict[str, torch.Tensor]: ...

    def after_step(self, step: int, total: int) -> None: ...


def needs(method: type, options: dict) -> Needs:
    """A registered class's needs: its ``needs(options)`` where it declares them, the frozen teacher otherwise."""
    declared = getattr(method, "needs", None)
    return declared(options) if declared else Needs.TEACHER
