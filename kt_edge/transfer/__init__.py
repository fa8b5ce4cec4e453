"""Distillation methods, by the name a recipe's ``distill.method`` uses.

A method keeps the contract of ``kt_edge.engine.method`` and may declare ``needs(options) -> Needs``
(the frozen teacher when it does not):

- ``Needs.PSEUDO_LABELS``: the pipeline runs the cluster stage first, builds the training set with the
  method's ``training_set(images, labels, options)`` and passes ``n_classes`` to the constructor;
- ``Needs.FEATURES``: the teacher is a ``CachedTeacher`` of extracted features and the batch's label
  slot holds each image's index.

``distill.method`` may also name a teacher method (``moco``, ...): the student then trains alone,
with no teacher, which is the self-supervised baseline every distillation method must beat.
"""

from kt_edge.transfer.compress import Compress
from kt_edge.transfer.pseudo_labels import ClusterTransfer
from kt_edge.transfer.regress import Regress
from kt_edge.transfer.seed import Seed

DISTILLERS = {"seed": Seed, "compress": Compress, "cluster": ClusterTransfer, "regress": Regress}
