"""Pinning a worker process to one CPU (`pin_workers`, `dialog-server --pin-workers`).

With one worker per CPU, a worker's event loop and gRPC's poller and event-engine threads hand
every call to each other; pinned to one CPU they do so on one core's warm caches, and the two
workers stop trading places on the cores. Alternated benchmark runs showed lower tail latency at
the same throughput (docs/performance.md, Pinning workers).

Only for a machine (or a container with its own cpuset) that runs one server: every server
started with it puts worker 0 on the first CPU it may use, so servers sharing CPUs would pile
their workers onto the same ones.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def cpu_for_worker(index: int, allowed: set[int]) -> int:
    """The CPU of worker `index`: the allowed CPUs in order, round-robin when workers outnumber them."""
    if not allowed:
        raise ValueError("no CPU allowed")
    ordered = sorted(allowed)
    return ordered[index % len(ordered)]


def pin_worker(index: int) -> int | None:
    """Pin every thread of this process, and the ones it starts later, to worker `index`'s CPU.

    Returns the CPU, or None where the platform cannot pin (logged once)."""
    if not hasattr(os, "sched_setaffinity"):
        log.warning("pin_workers: this platform cannot pin processes to CPUs; workers are not pinned")
        return None
    cpu = cpu_for_worker(index, os.sched_getaffinity(0))
    # sched_setaffinity(0) pins the calling thread (new threads inherit it); threads started
    # before now (there should be none) are pinned one by one.
    tasks = Path("/proc/self/task")
    thread_ids = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [0]
    for thread_id in thread_ids:
        os.sched_setaffinity(thread_id, {cpu})
    return cpu
