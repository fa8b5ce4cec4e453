"""DataLoader workers under a scheduler: SIGINT and SIGTERM are the main process's to handle.

``timeout``, Slurm, Kubernetes and systemd signal the whole process group, and Ctrl-C signals the
terminal's: a worker that died of it would turn the main process's clean stop (resume point, exit
130) into a traceback. A worker is born with both signals blocked (so none can kill it between the
fork and ``worker_init_fn``) and keeps them blocked; a thread takes them: the main process's own
SIGTERM (multiprocessing's exit handler, torch's shutdown) ends the worker cleanly, as torch's own
worker handler does, and anyone else's is dropped. A worker whose main process was killed outright
exits on its own (torch's watchdog).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

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


def _take_stop_signals(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            os._exit(0)  # exit 0: torch's SIGCHLD check reports any other end as a failed worker


def take_stop_signals(_worker_id: int) -> None:
    """``worker_init_fn``: the blocked stop signals go to a thread that tells the main process's from the rest."""
    threading.Thread(target=_take_stop_signals, args=(os.getppid(),), daemon=True).start()


def worker_options(workers: int) -> dict:
    """DataLoader keywords for ``workers`` worker processes that leave a stop to the main process."""
    if workers == 0:
        return {"num_workers": 0}
    return {"num_workers": workers, "worker_init_fn": take_stop_signals, "multiprocessing_context": _WorkerContext()}
