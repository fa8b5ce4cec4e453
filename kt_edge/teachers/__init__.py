"""Teacher methods, by the name a recipe's ``teacher.method`` uses.

Jigsaw++ is registered as ``jigsaw_pp`` (a plain YAML scalar and a valid file and metric name).
"""

from kt_edge.teachers.barlow import BarlowTwins
from kt_edge.teachers.byol import BYOL
from kt_edge.teachers.jigsaw import Jigsaw, JigsawPP
from kt_edge.teachers.moco import MoCo
from kt_edge.teachers.relative_patch import RelativePatch
from kt_edge.teachers.rotation import Rotation
from kt_edge.teachers.simclr import SimCLR

TEACHERS = {
    "moco": MoCo,
    "simclr": SimCLR,
    "byol": BYOL,
    "barlow": BarlowTwins,
    "jigsaw": Jigsaw,
    "jigsaw_pp": JigsawPP,
    "rpl": RelativePatch,
    "rotation": Rotation,
}
