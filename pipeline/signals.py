"""SIGTERM and SIGINT (Ctrl-C): a run stops within seconds, in whatever phase it is, with a report.

The run owns both signals from the moment it holds its output's lease until it returns:

- while it plans, waits for its replica pool or collects results (`StopSignals.call`), the
  signal raises `Interrupted` at once: the phase is abandoned (units in flight too: their
  partial files are ignored, a rerun redoes them);
- while it starts Ray the signal is acted on as `ray.init` returns: a signal that comes as
  ray.init forks runs in the fork hooks, where an exception is lost (and logging's lock left taken);
- anywhere else (short steps) it is only recorded, and the run skips what is left of its work.

Either way the run then writes `_run_report.json` with `complete: false` and `interrupted`,
releases the lease and returns; the CLI exits 1 (130 for SIGINT).

`Interrupted` is a KeyboardInterrupt because Ray's blocking calls give up only on that: Ray
Data waiting for its actor pool (up to --replica-start-timeout-s) swallows any other exception
until the wait times out. And `ray.init` would replace the SIGTERM handler with its own (exit at
once, no report): while a run owns the signals, Ray's setter does nothing.

Ray's core worker installs abseil's failure signal handler for SIGTERM in C++, over ours: it
arms a 3-second `alarm` that aborts the process (SIGABRT) and only then chains to our handler
(ray #64830); a local Ray's shutdown takes longer, so every SIGTERM ended in SIGABRT. So while
the run owns the signals the core worker is started without it
(`RAY_DISABLE_FAILURE_SIGNAL_HANDLER`, read as `ray.init` makes the core worker); the run takes
the signals back once Ray is up (`reown`: a driver that joined Ray before the run), and a signal
that still found abseil's handler cancels its abort fuse as soon as our handler runs.

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
        self._ray_saved: list = []  # (module, attribute, value before) of what _keep_ray_off set

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
        for module, name, value in self._ray_saved:
            setattr(module, name, value)

    def reown(self) -> None:
        """Take the signals back from whatever was installed over our handler (Ray's, in C++)."""
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
        if self.signal is None:
            self._armed = phase if at_once else None
            try:
                result = fn(*args, **kwargs)
                if at_once or self.signal is None:
                    return result
            except KeyboardInterrupt:  # ours, or Ray's own after it ran our handler inside a wait
                if self.signal is None or not at_once:
                    raise
            finally:
                self._armed = None
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
        for module, name, value in ((ray_utils, "set_sigterm_handler", lambda handler: None),
                                    (ray_constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", True)):
            self._ray_saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)


def _cancel_abort_fuse() -> None:
    """abseil's failure signal handler, run before ours, arms `alarm(3)` with a SIGALRM handler
    that aborts: cancel it. Only when SIGALRM has no Python handler, so an alarm of the program's
    own is left alone: `getsignal` knows only handlers installed from Python (one installed from
    C reads as the one Python saw at startup, SIG_DFL, or None), never abseil's."""
    if hasattr(signal, "SIGALRM") and not callable(signal.getsignal(signal.SIGALRM)):
        signal.alarm(0)

