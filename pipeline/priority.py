"""CPU priority of the run's Ray actors (replicas, progress tracker): normal, not Ray's nice 15."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def normal_priority() -> str | None:
    """Every thread of this process at normal CPU priority (call it before torch starts its OpenMP
    threads); returns what was done, or None.

    Ray starts workers at nice 15, so a CPU replica loses its cores to anything at normal priority
    (the driver's Ray Data loop, the raylet), and an OpenMP team is as slow as its slowest thread.
    All threads: Ray's I/O threads left at 15 would starve, delaying results and heartbeats (which
    prove a replica alive). Needs CAP_SYS_NICE (root in most containers); without it, one log line."""
    try:
        now = os.getpriority(os.PRIO_PROCESS, 0)  # on Linux, this thread's nice value
    except (AttributeError, OSError):
        return None
    if now <= 0:
        return None
    try:  # on Linux a nice value is per thread: each one of /proc/self/task, this one first
        threads = [0] + sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except OSError as e:
            if tid == 0:
                log.info("Ray worker left at nice %d (Ray's worker niceness; %s): start Ray with RAY_worker_niceness=0 "
                         "on CPU nodes to give the run's actors their cores", now, e.strerror)
                return None
    return f"nice {now} -> 0, {len(threads) - 1} thread(s)"
