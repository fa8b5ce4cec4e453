"""Real ``kt-edge`` processes for the tests that need one: a second command, a scheduler's signal, a full disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sample_kit import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the CPU is shared: one thread each runs fastest


def kt_edge(*args, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """``kt-edge ARGS`` in the background (after ``prefix``: ``timeout``, ``setpriv``, ...)."""
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "kt_edge", *map(str, args)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def under_timeout(*args) -> subprocess.Popen:
    """``kt-edge ARGS`` as ``timeout -s TERM`` runs it: in a process group of its own, which ``timeout``
    signals as a whole (the command first, then the group) when it is itself sent SIGTERM, as a scheduler
    stopping a job does."""
    return kt_edge(*args, prefix=("timeout", "-s", "TERM", "600"))


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"  # a zombie has ended


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 240):
    """Poll ``condition()`` until it is truthy and return that; fail if ``proc`` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"kt-edge exited ({proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.02)
    return value


def error_lines(stderr: str) -> list[str]:
    """What a user reads as errors: 'error:' lines, tracebacks and Python's 'Exception ignored' noise."""
    return [
        line
        for line in stderr.splitlines()
        if line.startswith(("error:", "Traceback", "Exception ignored")) or "Error" in line.split(":")[0]
    ]


def without_dac_override() -> tuple[str, ...]:
    """A prefix under which file permissions bind even root (which reads any folder otherwise)."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to bind")
    return ("setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search")


def on_tmpfs(folder: Path, size: str, *args) -> tuple[int, str, list[str]]:
    """``kt-edge ARGS`` with a fresh tmpfs of ``size`` mounted on ``folder`` (a private mount namespace, so
    nothing else sees it); returns the exit code, stderr, and the files left on the tmpfs as `find` lists
    them (the mount ends with the command)."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare to mount a private tmpfs")
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {folder}"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()}")
    command = " ".join(f"'{a}'" for a in (sys.executable, "-m", "kt_edge", *map(str, args)))
    script = (
        f"mount -t tmpfs -o size={size} tmpfs '{folder}' && {command}; code=$?; "
        f"echo '--- files'; find '{folder}' -type f | sort; exit $code"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )
    files = done.stdout.split("--- files\n", 1)[-1].split()
    return done.returncode, done.stderr, [str(Path(f).relative_to(folder)) for f in files]
