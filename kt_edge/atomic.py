"""Artifacts appear whole or not at all: the runtime's atomic writer, with what the host adds to it (a
writer that reports a full disk as one, strict JSON, cleanup after a killed writer)."""

from __future__ import annotations

import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from kt_edge_runtime.atomic import atomic_path, write_bytes

__all__ = ["atomic_file", "atomic_path", "os_errors", "remove_temps", "write_bytes", "write_json", "write_text"]


@contextmanager
def atomic_file(target: Path | str) -> Iterator[BinaryIO]:
    """``atomic_path`` as an open binary file, for writers that take one (``torch.save``).

    torch.save reports a failed write as "unexpected pos", which hides a full disk: the OSError the
    file itself raised is raised instead.
    """
    with atomic_path(target) as tmp, open(tmp, "wb") as raw:
        handle = _Writes(raw)
        try:
            yield handle
        except Exception:
            if handle.error is not None:
                raise handle.error from None
            raise


class _Writes:
    """A file that remembers the OSError its write or flush raised, whatever the writer turns it into."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.error = raw, None

    def write(self, data) -> int:
        return self._keep(self.raw.write, data)

    def flush(self) -> None:
        self._keep(self.raw.flush)

    def _keep(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self.raw, name)


@contextmanager
def os_errors() -> Iterator[None]:
    """Raise a writer's error that only names an OS error in its text (safetensors: "... (os error 28)") as
    the OSError it is, so a full disk is told as one."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from exc


def remove_temps(folder: Path | str) -> None:
    """Delete the temp files a killed writer left in ``folder`` (hidden ``.*.tmp``: never taken for artifacts)."""
    for stale in Path(folder).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def write_text(target: Path | str, text: str) -> None:
    write_bytes(target, text.encode())


def write_json(target: Path | str, obj) -> None:
    """Strict JSON: a NaN or infinite number (a loss no step computed, say) is written as null."""
    write_text(target, json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj
