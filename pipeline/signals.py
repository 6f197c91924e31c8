"""SIGTERM and SIGINT (Ctrl-C): a run stops within seconds, in whatever phase, with a report.

From taking its output's lease until it returns, the run owns both signals. While it plans,
waits for its replica pool or collects results (`StopSignals.call`), a signal raises
`Interrupted` at once and the phase is abandoned (units in flight too: a rerun redoes them).
While it starts Ray, the signal is acted on as `ray.init` returns: one that comes as ray.init
forks runs in the fork hooks, where an exception is lost (and logging's lock left taken).
Elsewhere (short steps) it is only recorded and the run skips what is left. Either way the run
writes `_run_report.json` (`complete: false`, `interrupted`), releases the lease and returns;
the CLI exits 1 (130 for SIGINT).

`Interrupted` is a KeyboardInterrupt because Ray's blocking calls give up only on that (Ray Data
waiting for its actor pool swallows any other exception until --replica-start-timeout-s). While
the run owns the signals, `ray.init`'s SIGTERM handler setter (exit at once, no report) does
nothing, and the core worker starts without abseil's C++ failure signal handler
(`RAY_DISABLE_FAILURE_SIGNAL_HANDLER`), which would arm a 3-second `alarm` that aborts the
process before chaining to ours (ray #64830): a local Ray's shutdown takes longer, so every
SIGTERM ended in SIGABRT. The run takes the signals back once Ray is up (`reown`: a driver that
joined Ray before the run), and our handler cancels the abort fuse of a signal that still found
abseil's handler.

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
    """Context manager owning SIGTERM / SIGINT for a run. `signal` names the first signal received
    (None: none), `phase` the phase it stopped; losing `lease`, the run's output lease, stops it too."""

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
        """Take the signals back from what was installed over our handler (Ray's, in C++)."""
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
        """`fn(*args, **kwargs)`'s result, or None when a signal came before or during it (which
        stops it at once, or with `at_once=False` lets it finish and drops its result)."""
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
        """Keep `ray.init`'s SIGTERM handler and abseil's failure signal handler off (see the module doc)."""
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
    """Cancel the `alarm(3)` that abseil's failure signal handler, run before ours, armed to abort;
    only when SIGALRM has no Python handler, so the program's own alarm is left alone (`getsignal`
    never sees abseil's: one installed from C reads as SIG_DFL or None)."""
    if hasattr(signal, "SIGALRM") and not callable(signal.getsignal(signal.SIGALRM)):
        signal.alarm(0)

