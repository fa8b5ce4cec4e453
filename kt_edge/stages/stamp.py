"""A stage's "done" stamp: the digest of the inputs its output was made from, in the output's own folder.

Every stage has exactly this one marker. It is written last, after every file it vouches for, and deleted
before the first byte of a rewrite, so a killed stage never looks finished and a finished one never vouches
for other inputs. Deleting an output folder deletes its stamp with it.
"""

from __future__ import annotations

from pathlib import Path

from kt_edge import atomic

NAME = ".done"  # hidden: never taken for an artifact (the bundle is copied to the device as it is)


def read(folder: Path) -> str | None:
    """The inputs digest the output in ``folder`` was finished from, or None when it is not finished."""
    try:
        return (Path(folder) / NAME).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def fresh(folder: Path, inputs: str) -> bool:
    return read(folder) == inputs


def clear(folder: Path) -> None:
    (Path(folder) / NAME).unlink(missing_ok=True)


def write(folder: Path, inputs: str) -> None:
    atomic.write_text(Path(folder) / NAME, inputs)
