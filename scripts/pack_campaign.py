"""Pack what the GPU campaign needs on a device machine that has no copy of the data and no registry.

Copies the CIFAR-10 ImageFolder tree (the JPEG files as they are) into data/cifar10 and downloads the wheels
the device image lacks (pydantic and its core, onnxslim) into .whl; both folders are ignored by git and
travel with the device call as ``carry`` (see benchmarks/campaign.py). Ends by adding up what would travel
(the tracked and untracked tree plus the carried folders) against the device's 64 MiB limit.

    python scripts/pack_campaign.py                         # CIFAR-10 from ../shared/data/cifar10
    python scripts/pack_campaign.py --cifar10 PATH --skip-wheels
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20
WHEELS = (
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "onnxslim==0.1.98",
)  # for the device's Python 3.12 on x86-64
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def copy_cifar10(source: Path, target: Path) -> int:
    for split in ("train", "test"):
        if not (source / split).is_dir():
            sys.exit(f"error: {source / split} is not a folder (expected CIFAR-10 as train/ and test/ ImageFolders)")
    if target.exists():
        shutil.rmtree(target)
    for split in ("train", "test"):
        shutil.copytree(source / split, target / split)
    return sum(1 for f in target.rglob("*") if f.is_file())


def download_wheels(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *[f"--platform={p}" for p in PLATFORMS],
        "-d",
        str(folder),
        *WHEELS,
    ]
    subprocess.run(command, check=True)


def travelling_bytes(carry: list[Path]) -> int:
    """What a device call sends: the files git tracks or would track, plus the carried folders."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    tree = sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())
    return tree + sum(f.stat().st_size for folder in carry for f in folder.rglob("*") if f.is_file())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar10", type=Path, default=REPO.parent / "shared" / "data" / "cifar10")
    p.add_argument("--skip-wheels", action="store_true", help="keep .whl as it is (no registry here)")
    args = p.parse_args(argv)
    files = copy_cifar10(args.cifar10, REPO / "data" / "cifar10")
    print(f"data/cifar10: {files} files")
    if not args.skip_wheels:
        download_wheels(REPO / ".whl")
    carry = [REPO / "data" / "cifar10", REPO / ".whl"]
    total = travelling_bytes([c for c in carry if c.exists()])
    print(f"a device call carries {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f}")
    if total > LIMIT:
        sys.exit("error: over the device's limit: keep the tree smaller")


if __name__ == "__main__":
    main()
