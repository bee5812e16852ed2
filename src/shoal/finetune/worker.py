"""The fine-tuning worker: a process that claims jobs from the store's queue and runs them.

`shoal serve` starts one by default; `shoal worker` starts more, here or on another machine
sharing the database and $SHOAL_HOME. SIGTERM (or Ctrl-C) makes a busy worker checkpoint its job
and put it back in the queue before exiting.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid

from .runner import JobRunner

log = logging.getLogger("shoal.worker")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def run_worker(store, home, *, poll_s: float = 1.0, lease_s: float = 60.0,
               heartbeat_s: float = 5.0, once: bool = False, max_jobs: int | None = None) -> int:
    """Claim and run jobs until SIGTERM/SIGINT (or, with `once`, until the queue is empty).
    Returns the number of jobs run."""
    runner = JobRunner(store, home, worker_id(), lease_s=lease_s, heartbeat_s=heartbeat_s)

    def stop(signum, _frame) -> None:
        log.warning("worker: signal %s, stopping after a checkpoint", signum)
        runner.shutting_down = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, stop)
        except ValueError:  # not the main thread (tests): no signal handling
            pass
    n = 0
    while not runner.shutting_down and (max_jobs is None or n < max_jobs):
        if runner.run_next():
            n += 1
            continue
        if once:
            break
        time.sleep(poll_s)
    return n
