"""DataLoader workers under a scheduler: SIGINT and SIGTERM are the main process's to handle.

``timeout``, Slurm, Kubernetes and systemd signal the whole process group, and Ctrl-C signals the
terminal's: a worker that died of it would turn the main process's clean stop (resume point, exit
130) into a traceback. Workers ignore both; the main process stops them when it closes its loader,
and a worker whose main process was killed outright exits on its own (torch's watchdog).

A worker is born with both signals blocked and unblocks them only once it ignores them: a signal
that arrives between the fork and ``worker_init_fn`` stays pending and is then discarded, instead
of killing the worker in that window.
"""

from __future__ import annotations

import multiprocessing
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _BornDeafProcess(multiprocessing.get_context().Process):
    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # the child inherits the mask
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal held meanwhile reaches the main process now


class _WorkerContext(type(multiprocessing.get_context())):
    Process = _BornDeafProcess


def ignore_stop_signals(_worker_id: int) -> None:
    """``worker_init_fn``: ignore, then unblock (a pending stop signal is discarded)."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def worker_options(workers: int) -> dict:
    """DataLoader keywords for ``workers`` worker processes that leave a stop to the main process."""
    if workers == 0:
        return {"num_workers": 0}
    return {"num_workers": workers, "worker_init_fn": ignore_stop_signals, "multiprocessing_context": _WorkerContext()}
