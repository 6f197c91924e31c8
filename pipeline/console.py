"""What a user sees while a run goes (README: What you see while it runs): our lines, one live
progress line (redrawn in place on a terminal, printed every 30 s otherwise), Ray's logs kept quiet.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import time

PREFIX = "[persimmon-batch] "


def _count(n: float) -> str:
    return f"{int(round(n)):,}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_text(rows: int, total: int, tokens: int, errors: int, busy: int, elapsed: float) -> str:
    """The progress line's text (no prefix)."""
    pct = f" ({100 * rows / total:.0f}%)" if total else ""
    rate = rows / elapsed if elapsed > 0 else 0.0
    eta = _duration((total - rows) / rate) if rate > 0 and total > rows else ("-" if rows < total else "0s")
    return (f"rows {_count(rows)}/{_count(total)}{pct} | {rate:.1f} rows/s | {_count(tokens / elapsed if elapsed > 0 else 0)} "
            f"tok/s | ETA {eta} | {busy} replica{'s' if busy != 1 else ''} busy | {_count(errors)} error"
            f"{'s' if errors != 1 else ''}")


class Console:
    """Prints our lines, and the live progress line while `live(tracker)` runs: `unit_done` counts
    the units received, the run's ProgressTracker those in flight."""

    def __init__(self, enabled: bool = True, stream=None, interval: float | None = None, clock=time.monotonic):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (1.0 if self.tty else 30.0)
        self.clock = clock
        self._lock = threading.Lock()
        self._drawn = False  # a progress line is on screen (terminal only)
        self.total = self.rows = self.tokens = self.errors = 0
        self.t0 = clock()
        self._live: list[dict] = []

    # ---- lines ------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._drawn:
                self.stream.write("\r\x1b[K")  # clear the progress line, print above it
            self.stream.write(PREFIX + msg + "\n")
            if self._drawn:
                self.stream.write(PREFIX + self.text())
            self.stream.flush()

    # ---- counts -----------------------------------------------------------------------------
    def start(self, total_rows: int) -> None:
        self.total, self.t0 = total_rows, self.clock()

    def unit_done(self, st: dict) -> None:
        with self._lock:
            if st.get("status") in ("done", "skipped"):
                self.rows += st.get("rows_out") or 0
                self.tokens += st.get("tokens_generated") or 0
                self.errors += st.get("rows_error") or 0
            self._live = [a for a in self._live if a.get("unit") != st.get("output", "").rsplit("/", 1)[-1]]

    def text(self) -> str:
        live = self._live
        return progress_text(self.rows + sum(a.get("rows_done", 0) for a in live), self.total,
                             self.tokens + sum(a.get("tokens", 0) for a in live),
                             self.errors + sum(a.get("errors", 0) for a in live),
                             len({a.get("actor_id") for a in live}), self.clock() - self.t0)

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K" + PREFIX + self.text() + ("\n" if final else ""))
                self._drawn = not final
            else:
                self.stream.write(PREFIX + self.text() + "\n")
            self.stream.flush()

    @contextlib.contextmanager
    def live(self, tracker):
        """Redraw the progress line every `interval` seconds until the block ends, then once more."""
        stop = threading.Event()

        def loop():
            while not stop.wait(self.interval):
                self._poll(tracker)
                self.draw()

        thread = threading.Thread(target=loop, name="persimmon-batch-progress", daemon=True)
        if self.enabled:
            thread.start()
        try:
            yield self
        finally:
            stop.set()
            if thread.is_alive():
                thread.join(timeout=15)
            if self.enabled:
                self._live = []
                self.draw(final=True)

    def _poll(self, tracker) -> None:
        """The units in flight, from the run's ProgressTracker (advisory: kept as they were if it does not answer)."""
        if tracker is None:
            return
        with contextlib.suppress(Exception):
            import ray

            live = ray.get(tracker.running.remote(), timeout=10)
            with self._lock:
                self._live = live


# Ray Data loggers whose console lines the run says better: the stack trace of an error that
# ends the Dataset (reported in one line) and "Progress bars disabled".
HUSHED = ("ray.data.exceptions", "ray.data._internal.progress")


def _not_hushed(record: logging.LogRecord) -> bool:
    return not record.name.startswith(HUSHED)


@contextlib.contextmanager
def quiet_ray(verbose: bool):
    """Unless `verbose`, for the block: Ray's driver logs at WARNING, Ray Data's console handler at
    WARNING less `HUSHED` (its ray-data.log in the session's logs keeps everything)."""
    if verbose:
        yield
        return
    importlib.import_module("ray.data")  # sets up Ray Data's logging handlers

    ray_logger = logging.getLogger("ray")
    console = [h for h in logging.getLogger("ray.data").handlers
               if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    saved = ray_logger.level, [h.level for h in console]
    ray_logger.setLevel(logging.WARNING)
    for h in console:
        h.setLevel(logging.WARNING)
        h.addFilter(_not_hushed)
    try:
        yield
    finally:
        ray_logger.setLevel(saved[0])
        for h, level in zip(console, saved[1]):
            h.setLevel(level)
            h.removeFilter(_not_hushed)
