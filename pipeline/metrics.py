"""Ray metrics from each replica (README: What you see while it runs). They count work done: a
retried unit counts again, unlike the run report. Outside Ray nothing is recorded.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)
BATCH_SECONDS_BOUNDARIES = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600]


class ReplicaMetrics:
    def __init__(self, task: str):
        self.task = task
        self.enabled = False
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            tags = ("task",)
            self.rows = metrics.Counter("persimmon_batch_rows", "Rows processed (result or error).", tag_keys=tags)
            self.tokens = metrics.Counter("persimmon_batch_generated_tokens", "Tokens generated.", tag_keys=tags)
            self.errors = metrics.Counter("persimmon_batch_row_errors", "Rows with an error, by kind.",
                                          tag_keys=("task", "kind"))
            self.seconds = metrics.Histogram("persimmon_batch_batch_seconds", "Seconds per batch.",
                                             boundaries=BATCH_SECONDS_BOUNDARIES, tag_keys=tags)
            self.enabled = True
        except Exception as e:  # noqa: BLE001 - metrics are advisory: never fail a replica for them
            log.warning("Ray metrics unavailable (%s); going on without them", e)

    def batch(self, rows: int, tokens: int, errors_by_kind: Counter, seconds: float) -> None:
        if not self.enabled:
            return
        try:
            tags = {"task": self.task}
            if rows:
                self.rows.inc(rows, tags=tags)
            if tokens:
                self.tokens.inc(tokens, tags=tags)
            for kind, n in errors_by_kind.items():
                self.errors.inc(n, tags={"task": self.task, "kind": kind})
            self.seconds.observe(seconds, tags=tags)
        except Exception as e:  # noqa: BLE001
            log.warning("Ray metrics failed (%s); going on without them", e)
            self.enabled = False
