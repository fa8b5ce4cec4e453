"""A checkpoint folder whose weights travel in parts: small enough for a repository or a file-size limit.

``write_parts`` stores a checkpoint's weights as fp16 safetensors cut into parts of at most ``max_bytes``,
and records every part's sha256 (and the whole file's) in the folder's sidecar under ``parts``.
``join_parts`` puts the weights back together, checking each digest, the first time the folder is loaded;
a part that was changed, cut short or lost is refused by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from kt_edge import atomic
from kt_edge.errors import CheckpointError

MAX_PART_BYTES = 15 * 2**20


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_parts(
    folder: Path, out: Path, weights: str, sidecar: str, max_bytes: int = MAX_PART_BYTES, **provenance
) -> list[Path]:
    """The checkpoint in ``folder`` as ``out``/<sidecar> plus <weights>.part-<i> files, its floating-point
    tensors in fp16; ``provenance`` is added to the sidecar. Returns the files written."""
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(str(folder / weights)).items()
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(out / weights) as tmp, atomic.os_errors():
        save_file(state, str(tmp))
        data = tmp.read_bytes()
    (out / weights).unlink()
    files, written = [], []
    for index, start in enumerate(range(0, len(data), max_bytes)):
        chunk = data[start : start + max_bytes]
        path = out / f"{weights}.part-{index}"
        atomic.write_bytes(path, chunk)
        files.append({"name": path.name, "bytes": len(chunk), "sha256": _sha256(chunk)})
        written.append(path)
    card = json.loads((folder / sidecar).read_text())
    card.update(
        provenance,
        dtype="float16",
        parts={"file": weights, "bytes": len(data), "sha256": _sha256(data), "files": files},
    )
    atomic.write_json(out / sidecar, card)
    return [out / sidecar, *written]


def join_parts(folder: Path, card: dict) -> Path:
    """Reassemble the weights the sidecar ``card`` lists in parts (each part and the whole checked by sha256)."""
    spec = card["parts"]
    chunks = []
    for part in spec["files"]:
        path = folder / part["name"]
        if not path.is_file():
            raise CheckpointError(f"{path}: a part of {spec['file']} is missing")
        chunk = path.read_bytes()
        if _sha256(chunk) != part["sha256"]:
            raise CheckpointError(
                f"{path}: sha256 differs from the one its sidecar records; the part was changed or cut short"
            )
        chunks.append(chunk)
    data = b"".join(chunks)
    if _sha256(data) != spec["sha256"]:
        raise CheckpointError(f"{folder}: the parts of {spec['file']} do not join into the file they were cut from")
    target = folder / spec["file"]
    atomic.write_bytes(target, data)
    return target
