"""Build the small CIFAR-10 sample shipped in data/sample/ for the quick start and the tests.

Takes a seeded, class-balanced choice of images from a CIFAR-10 ImageFolder tree and copies the
files unchanged:  python scripts/make_sample.py SHARED_DATA/cifar10 data/sample/cifar10
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="CIFAR-10 ImageFolder root with train/ and test/")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        for class_dir in sorted(p for p in (args.source / split).iterdir() if p.is_dir()):
            files = sorted(class_dir.iterdir())
            out = args.dest / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for path in sorted(rng.sample(files, per_class)):
                shutil.copyfile(path, out / path.name)
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
