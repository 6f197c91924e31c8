"""SIGTERM and SIGINT (Ctrl-C): a run stops within seconds, in whatever phase it is, with a report.

The run owns both signals from the moment it holds its output's lease until it returns:

- while it plans, waits for its replica pool or collects the replicas' results
  (`StopSignals.call`), the signal raises `Interrupted` at once: the phase is abandoned
  (units in flight too: their partial files are ignored, a rerun redoes them);
- while it starts Ray (seconds) the signal is acted on as `ray.init` returns: ray.init starts
  processes, and a signal that comes as one is forked runs in the fork hooks, where an exception
  is printed and lost (and logging's lock left taken);
- anywhere else (short steps: counting what was committed, writing the report, releasing the
  lease) it is only recorded, and the run skips what is left of its work.

Either way the run then writes `_run_report.json` with `complete: false` and `interrupted`,
releases the lease and returns; the CLI exits 1 (130 for SIGINT).

`Interrupted` is a KeyboardInterrupt because Ray's blocking calls give up only on that: Ray
Data waiting for its actor pool (`ray.get` with `wait_for_min_actors_s`, up to
--replica-start-timeout-s) runs the handler, sees a KeyboardInterrupt and returns at once, where
any other exception is swallowed until the wait times out. And `ray.init` would replace the
SIGTERM handler with its own (exit at once, no report): while a run owns the signals, Ray's
setter does nothing. A local Ray's processes are still stopped when the process exits (Ray's
atexit hook, and they share the driver's fate).

Ray's core worker (started in this process by `ray.init`) installs abseil's failure signal
handler for SIGTERM in C++, over ours: it prints "*** SIGTERM received ..." with a stack, arms a
3-second `alarm` that aborts the process (SIGABRT) and only then chains to our handler (ray
#64830). A local Ray's shutdown takes longer than 3 s, so every SIGTERM while the run used
Ray ended in SIGABRT instead of exit 1, and a slower report or lease release would have been
cut short. So while the run owns the signals the driver's core worker is started without it
(`RAY_DISABLE_FAILURE_SIGNAL_HANDLER`, as Ray reads it when `ray.init` makes the core worker:
a signal late in ray.init, while the main thread waits in C, found it and aborted before any
Python handler could cancel the fuse); the run still takes SIGTERM back once Ray is up
(`reown`: a driver that joined Ray before the run), and a signal that still found abseil's
handler cancels its abort fuse as soon as our handler runs.

Only the main thread can own signal handlers; elsewhere (a notebook's worker thread) nothing is
installed and the run cannot be interrupted this way.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the phase the run was in (see the module docstring)."""


class StopSignals:
    """Context manager owning SIGTERM / SIGINT for a run.

    `signal` names the first signal received (None: none), `phase` the phase it stopped.
    `lease` is the run's output lease: losing it stops the run too (checked as results come)."""

    def __init__(self):
        self.signal: str | None = None
        self.phase: str | None = None
        self.lease = None
        self._armed: str | None = None  # the phase a signal would stop now
        self._saved: dict = {}
        self._ray_setter = None
        self._ray_failure_handler = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in SIGNALS:
            self._saved[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)
        self._keep_ray_off()
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)
        if self._ray_setter is not None:
            import ray._private.utils as ray_utils

            ray_utils.set_sigterm_handler = self._ray_setter
        if self._ray_failure_handler is not None:
            import ray._private.ray_constants as ray_constants

            ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = self._ray_failure_handler

    def reown(self) -> None:
        """Take SIGTERM / SIGINT back from whatever was installed over our handler since
        `__enter__` (Ray's C++ failure signal handler, see the module docstring)."""
        for sig in self._saved:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        _cancel_abort_fuse()
        if self.signal is not None:
            return  # the run is stopping already: a second signal does not cut that short
        self.signal = signal.Signals(signum).name
        if self._armed is not None:
            self.phase = self._armed
            raise Interrupted(self.signal)

    def call(self, phase: str, fn, *args, at_once: bool = True, **kwargs):
        """`fn(*args, **kwargs)`, stopped at once by a signal: returns its result, or None when a
        signal came before or during it (`signal` and `phase` then say which and where). With
        `at_once=False` a signal lets `fn` finish first (its result is then dropped)."""
        if self.signal is not None:
            self.phase = self.phase or phase
            return None
        if not at_once:
            result = fn(*args, **kwargs)
            if self.signal is None:
                return result
            self.phase = self.phase or phase
            return None
        try:
            self._armed = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self._armed = None
        except KeyboardInterrupt:  # ours, or Ray's own after it ran our handler inside a wait
            if self.signal is None:
                raise
            self.phase = self.phase or phase
            return None

    def _keep_ray_off(self) -> None:
        """Stop `ray.init` from installing its SIGTERM handler while the run owns the signal, and
        its core worker from installing abseil's failure signal handler (see the module docstring)."""
        try:
            import ray._private.ray_constants as ray_constants
            import ray._private.utils as ray_utils
        except ImportError:
            return
        self._ray_setter = ray_utils.set_sigterm_handler
        ray_utils.set_sigterm_handler = lambda handler: None
        self._ray_failure_handler = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read as ray.init makes the core worker


def _cancel_abort_fuse() -> None:
    """abseil's failure signal handler, run before ours, arms `alarm(3)` with a SIGALRM handler
    that aborts: cancel it. Only when SIGALRM has no Python handler, so an alarm of the program's
    own is left alone: `getsignal` knows only handlers installed from Python (one installed from
    C reads as the one Python saw at startup, SIG_DFL, or None), never abseil's."""
    if hasattr(signal, "SIGALRM") and not callable(signal.getsignal(signal.SIGALRM)):
        signal.alarm(0)

