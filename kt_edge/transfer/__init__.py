"""Distillation methods, by the name a recipe's ``distill.method`` uses."""

from kt_edge.transfer.seed import Seed

DISTILLERS = {"seed": Seed}
