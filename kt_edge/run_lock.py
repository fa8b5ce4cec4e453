"""One command at a time per run directory.

Two commands on one run directory would clear each other's temp files, score each other's models
and interleave ``metrics.jsonl``. A command holds an exclusive ``flock`` on ``<run>/.lock`` for its
whole life; the file names the holder (command, PID, host, start time), so a second command is
refused with one line that says who holds it. The kernel drops the lock when its process dies,
however it dies; a file still naming a holder after that is the trace of a killed command, taken
over with a warning. Under torchrun the lock is rank 0's.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kt_edge.errors import RunDirBusy
from kt_edge.run_dir import RunDir


@contextmanager
def hold(run_dir: Path, command: str) -> Iterator[None]:
    """Hold ``run_dir`` for the ``with`` block, or raise RunDirBusy naming the command that holds it."""
    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: rank 0 holds the run directory
        yield
        return
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).lock
    fd, verified = _acquire(path)
    try:
        previous = _holder(fd)
        if previous:
            if not verified and _running(previous):
                raise RunDirBusy(_busy(run_dir, previous))
            warnings.warn(
                f"{run_dir}: took over the lock of {_describe(previous)}, which ended without releasing it (killed?)",
                stacklevel=3,
            )
        me = {
            "command": command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": dt.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: a command waiting on this file starts over
    finally:
        os.close(fd)


def _acquire(path: Path) -> tuple[int, bool]:
    """The lock file's descriptor, locked; ``verified`` is False where the filesystem has no flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirBusy(_busy(path.parent, holder)) from None
        except OSError:  # no locks here (some network filesystems): the PID the file names decides
            return fd, False
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, True
        os.close(fd)  # the holder ended and removed the file between our open and our lock: again


def _holder(fd: int) -> dict:
    """Who the lock file names ({} for an empty or foreign file)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _running(holder: dict) -> bool:
    """Whether the holder may still run: only a PID on this host can be checked."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    if not holder:
        return "another kt-edge command (starting up)"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return (
        f"`kt-edge {holder.get('command', '?')}` (PID {holder.get('pid', '?')} on host "
        f"{holder.get('host', '?')}{since})"
    )


def _busy(run_dir: Path, holder: dict) -> str:
    return (
        f"{run_dir} is in use by {_describe(holder)}: one command at a time per run directory; wait for it "
        "to end or stop it, or give this run another name"
    )
