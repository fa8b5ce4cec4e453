"""Labelled split pairs, for evaluation and export parity: both labelled, the same classes in the same
order (a label id must name the same class in the k-NN bank and in the scored split)."""

from __future__ import annotations

from kt_edge.data.augment import eval_transform
from kt_edge.data.sources import Images, open_source
from kt_edge.errors import DataError


def class_mismatch(first: str, a: list[str], second: str, b: list[str]) -> str | None:
    """None when the class lists are equal, else one line that says how they differ."""
    if a == b:
        return None
    only_a, only_b = [c for c in a if c not in b], [c for c in b if c not in a]
    if only_a or only_b:
        detail = f"only in the first {_few(only_a)}, only in the second {_few(only_b)}"
    else:
        i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        detail = f"the same classes in another order: class {i} is {a[i]!r} vs {b[i]!r}"
    return f"classes differ between {first} ({len(a)}) and {second} ({len(b)}): {detail}"


def labelled_pair(train_source, test_source, image_size: int, seed: int = 0) -> tuple[Images, Images]:
    """Open a (bank, scored) pair of recipe DataSources, checked, with the eval transform applied."""
    train_set, test_set = open_source(train_source, seed), open_source(test_source, seed)
    for split in (train_set, test_set):
        if not split.labelled:
            raise DataError(f"{split.name}: evaluation needs labels (an ImageFolder tree or CIFAR-10 pickles)")
    mismatch = class_mismatch(train_set.name, train_set.classes, test_set.name, test_set.classes)
    if mismatch:
        raise DataError(mismatch)
    transform = eval_transform(image_size)
    return train_set.with_transform(transform), test_set.with_transform(transform)


def _few(names: list[str]) -> str:
    return "[" + ", ".join(names[:5]) + (f", ... {len(names)} in all" if len(names) > 5 else "") + "]"
