"""Teacher methods, by the name a recipe's ``teacher.method`` uses."""

from kt_edge.teachers.moco import MoCo

TEACHERS = {"moco": MoCo}
