"""DataLoader workers under a scheduler: SIGINT and SIGTERM are the main process's to handle.

``timeout``, Slurm, Kubernetes and systemd signal the whole process group, and Ctrl-C signals the
terminal's: a worker that died of it would turn the main process's clean stop (resume point, exit
130) into a traceback. Workers ignore both; the main process stops them when it closes its loader,
and a worker whose main process was killed outright exits on its own (torch's watchdog).
"""

from __future__ import annotations

import signal


def ignore_stop_signals(_worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader with workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
