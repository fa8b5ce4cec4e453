"""Put a teacher the GPU campaign brought back into the project's teacher slot, checked part by part.

The campaign returns ``teacher/`` (its sidecar ``model.json`` and the fp16 weights in parts of at most 15 MiB,
each with its sha256 in the sidecar). This copies them into ``models/cifar10-teacher/``, the folder
``recipes/quickstart-gpu-teacher.yaml`` imports, after joining the parts once to check every digest. The
joined ``model.safetensors`` is ignored by git: kt-edge joins the parts again on the first import.

    python scripts/ship_teacher.py RETURNED/teacher
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kt_edge.errors import CheckpointError  # noqa: E402
from kt_edge.models.checkpoint import SIDECAR  # noqa: E402
from kt_edge.models.parts import join_parts  # noqa: E402

SLOT = REPO / "models" / "cifar10-teacher"


def ship(source: Path, slot: Path = SLOT) -> list[Path]:
    card = json.loads((source / SIDECAR).read_text())
    if not isinstance(card.get("parts"), dict):
        raise CheckpointError(f"{source / SIDECAR} lists no parts: not a teacher the campaign shipped")
    names = [SIDECAR, *(part["name"] for part in card["parts"]["files"])]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            shutil.copy2(source / name, Path(tmp) / name)
        join_parts(Path(tmp), card)  # every part and the whole file, by sha256
    if slot.exists():
        shutil.rmtree(slot)
    slot.mkdir(parents=True)
    return [Path(shutil.copy2(source / name, slot / name)) for name in names]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the campaign's teacher/ folder")
    args = p.parse_args(argv)
    try:
        files = ship(args.source)
    except (CheckpointError, OSError, KeyError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    print(f"{len(files)} files in {SLOT.relative_to(REPO)}; distil it with recipes/quickstart-gpu-teacher.yaml")


if __name__ == "__main__":
    main()
