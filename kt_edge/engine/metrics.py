"""``metrics.jsonl``: one JSON record per line, appended in whole lines only.

A run killed or out of disk in the middle of a line would leave half a record, and the resumed run
would glue its first record onto it. So a failed write is cut back off, and a log that does not end
with a newline has its broken last line cut off when it is opened again. Readers skip a line that
is not a JSON record all the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


class MetricsLog:
    """Append-only, unbuffered: each record reaches the file when it is written (``tail -f`` works)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        os.ftruncate(self._fd, _whole_lines(self.path))

    def write(self, record: dict) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        size = os.fstat(self._fd).st_size
        try:
            while line:
                line = line[os.write(self._fd, line) :]
        except OSError:
            os.ftruncate(self._fd, size)  # no half line stays behind
            raise

    def close(self) -> None:
        os.close(self._fd)


def _whole_lines(path: Path, block: int = 1 << 16) -> int:
    """The length of the file up to and including its last newline."""
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - block)
            handle.seek(start)
            last = handle.read(end - start).rfind(b"\n")
            if last >= 0:
                return start + last + 1
            end = start
    return 0


def read_records(path: Path | str) -> Iterator[dict]:
    """Every whole record of a metrics log, in order; a line that is not a JSON object (cut short) is skipped."""
    with open(path, "rb") as lines:
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # cut short, or not UTF-8
                continue
            if isinstance(record, dict):
                yield record
