"""Task attempts, heartbeats and the stuck-replica watchdog (README: Nothing lost).

A replica opens an *attempt* with the run's `ProgressTracker` actor for each unit it starts and
sends a heartbeat after each batch: the record of retries (`rows_retried`) and of stuck replicas,
which `Watchdog` has the tracker kill after `batch_timeout_s` without a heartbeat (Ray restarts
them and retries the unit), so a run never hangs. The tracker uses only its own clock (node clock
skew is harmless) and lives on the driver's node (on a worker it would die with that node).
Heartbeats are fire-and-forget; without the tracker the run goes on. `dead_nodes` tells node
losses from replica deaths.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

log = logging.getLogger(__name__)


class ProgressTracker:
    """Ray actor holding every attempt of the run. States: running -> done | failed | io_error (by
    the replica), lost (its process died: its actor began another, or the run ended with it
    open), stuck (killed by the watchdog)."""

    def __init__(self):
        from .priority import normal_priority

        normal_priority()  # heartbeats answered late would read as stuck replicas on a busy node
        self.attempts: dict[str, dict] = {}
        self.handles: dict[str, object] = {}  # open attempt -> its replica actor (the watchdog kills it)
        self.pool: dict[str, object] = {}  # actor id -> handle, of every replica of the current round

    def start(self, attempt_id: str, info: dict, actor=None) -> None:
        now = time.monotonic()
        for key, a in self.attempts.items():  # one unit at a time per actor: older ones died
            if a["actor_id"] == info.get("actor_id") and a["state"] == "running" and info.get("actor_id"):
                a.update(state="lost", ended=now)
                self.handles.pop(key, None)
        self.attempts[attempt_id] = {**info, "state": "running", "started": now, "last": now,
                                     "rows_done": 0, "started_at": time.time()}
        if actor is not None:
            self.handles[attempt_id] = actor
            self.pool[info.get("actor_id") or attempt_id] = actor

    def beat(self, attempt_id: str, rows_done: int, tokens: int = 0, errors: int = 0) -> None:
        a = self.attempts.get(attempt_id)
        if a is not None and a["state"] == "running":
            a.update(last=time.monotonic(), rows_done=rows_done, tokens=tokens, errors=errors)

    def running(self) -> list[dict]:
        """The attempts in flight: unit, actor, rows done, tokens generated, row errors so far."""
        return [{"unit": a["unit"], "actor_id": a.get("actor_id"), "rows_done": a["rows_done"],
                 "tokens": a.get("tokens", 0), "errors": a.get("errors", 0)}
                for a in self.attempts.values() if a["state"] == "running"]

    def end(self, attempt_id: str, state: str, error: str | None = None) -> None:
        a = self.attempts.get(attempt_id)
        if a is not None and a["state"] == "running":
            a.update(state=state, ended=time.monotonic(), error=error)
        self.handles.pop(attempt_id, None)

    def end_round(self) -> int:
        """A pool is done: kill its replicas for good, return how many. Ray Data leaves that to
        reference counting, which lags (handles in cycles, ours), and a replica that died mid-unit
        may be restarting: either would hold the GPU the next round needs. Attempts keep their
        state; one left open reads as lost."""
        import ray

        killed = 0
        for handle in self.pool.values():
            with contextlib.suppress(Exception):  # already gone
                ray.kill(handle, no_restart=True)
                killed += 1
        self.handles.clear()
        self.pool.clear()
        return killed

    def check(self, timeout_s: float) -> list[dict]:
        """Kill the replicas of running attempts silent for more than `timeout_s`; return them."""
        import ray

        now, events = time.monotonic(), []
        for key, a in self.attempts.items():
            silent = now - a["last"]
            if a["state"] != "running" or not timeout_s or silent <= timeout_s:
                continue
            if not _same_process_alive(a):  # died on its own; Ray is restarting it
                a.update(state="lost", ended=now)
                self.handles.pop(key, None)
                continue
            a.update(state="stuck", ended=now, error=f"no batch finished for {silent:.0f} s")
            handle = self.handles.pop(key, None)
            if handle is not None:
                try:
                    ray.kill(handle, no_restart=False)
                except Exception as e:  # noqa: BLE001 - report it, nothing else to do
                    a["error"] += f" (could not kill it: {e})"
            events.append({"attempt": key, **self._public(a), "silent_s": round(silent, 1)})
        return events

    def snapshot(self) -> list[dict]:
        """Every attempt so far; `seconds`: how long it ran (to its end, or its last heartbeat)."""
        now = time.monotonic()
        return [{"attempt": k, **self._public(a), "silent_s": round(now - a["last"], 2),
                 "seconds": round((a["ended"] if "ended" in a else a["last"]) - a["started"], 3)}
                for k, a in self.attempts.items()]

    @staticmethod
    def _public(a: dict) -> dict:
        return {k: v for k, v in a.items() if k not in ("started", "last", "ended")}


def _same_process_alive(a: dict) -> bool:
    """Is the attempt's actor alive in the same process (not dead or restarted)? Yes if unknown."""
    try:
        import ray._private.state as state

        info = state.actors(a["actor_id"])
        return info.get("State") == "ALIVE" and info.get("Pid") in (None, a.get("pid"))
    except Exception:  # noqa: BLE001 - private API; err on the side of acting
        return True


class Attempts:
    """The replica's side of the tracker: `start`, `beat` and `end` an attempt; no-ops without one."""

    def __init__(self, tracker=None, where: dict | None = None):
        self.tracker, self.where, self.actor = tracker, where or {}, None
        if tracker is not None:
            with contextlib.suppress(Exception):  # not inside an actor (tests)
                import ray

                self.actor = ray.get_runtime_context().current_actor

    def start(self, unit_name: str, rows: int) -> str:
        attempt_id = uuid.uuid4().hex[:16]
        self._call("start", attempt_id, {"unit": unit_name, "rows": rows, **self.where}, self.actor)
        return attempt_id

    def beat(self, attempt_id: str, rows_done: int, tokens: int = 0, errors: int = 0) -> None:
        self._call("beat", attempt_id, rows_done, tokens, errors)

    def end(self, attempt_id: str, state: str, error: str | None = None) -> None:
        self._call("end", attempt_id, state, error)

    def _call(self, method: str, *args) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method).remote(*args)  # fire and forget
        except Exception as e:  # noqa: BLE001 - progress is advisory
            log.warning("progress tracker unavailable (%s); going on without it", e)
            self.tracker = None


def start_tracker(run_id: str):
    """The run's tracker actor (no CPU) on the driver's node, whose death ends the run anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    cls = ray.remote(num_cpus=0, max_restarts=0)(ProgressTracker)
    return cls.options(name=f"persimmon-batch-progress-{run_id}", scheduling_strategy=here).remote()


def dead_nodes(suspects: set[str] = frozenset(), probe_timeout_s: float = 3.0) -> set[str]:
    """Ids of the Ray nodes dead now (removed, lost, scaled down); empty if unknown. The GCS says
    so only after 15-30 s of failed health checks, so a `suspect` (where an attempt ended without
    a result) listed alive is probed: a raylet refusing a connection within `probe_timeout_s` is dead."""
    import socket

    import ray

    try:
        nodes = ray.nodes()
    except Exception as e:  # noqa: BLE001 - advisory: losses are then reported as deaths
        log.warning("could not list Ray's nodes (%s); node losses are reported as replica deaths", e)
        return set()
    dead = {n["NodeID"] for n in nodes if not n.get("Alive")}
    for n in nodes:
        if n["NodeID"] in suspects and n["NodeID"] not in dead:
            try:
                socket.create_connection((n["NodeManagerAddress"], n["NodeManagerPort"]), timeout=probe_timeout_s).close()
            except OSError:
                dead.add(n["NodeID"])
            except Exception:  # noqa: BLE001 - no address to ask: trust the GCS
                pass
    return dead


class DriverThread:
    """A daemon thread running `_loop` (until `_stop` is set) while a `with` block runs, if `_wanted()`."""

    def __init__(self, name: str):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _wanted(self) -> bool:
        return True

    def __enter__(self):
        if self._wanted():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)


class Watchdog(DriverThread):
    """Every few seconds, have the tracker kill replicas silent for over `timeout_s`; keep what it killed."""

    def __init__(self, tracker, timeout_s: float, say=print):
        super().__init__("persimmon-batch-watchdog")
        self.tracker, self.timeout_s, self.say = tracker, timeout_s, say
        self.events: list[dict] = []

    def _wanted(self) -> bool:
        return self.tracker is not None and bool(self.timeout_s)

    def _loop(self):
        import ray

        interval = min(10.0, max(0.5, self.timeout_s / 4))
        while not self._stop.wait(interval):
            try:
                events = ray.get(self.tracker.check.remote(self.timeout_s), timeout=60)
            except Exception as e:  # noqa: BLE001 - keep watching
                log.warning("watchdog: progress tracker did not answer (%s)", e)
                continue
            for ev in events:
                self.events.append(ev)
                self.say(f"STUCK replica {ev.get('actor_id')} (node {ev.get('node_id')}, pid {ev.get('pid')}): "
                         f"{ev['unit']} finished no batch for {ev['silent_s']:.0f} s "
                         f"(batch_timeout_s={self.timeout_s:g}); restarting it, the task is retried")

    def attempts(self) -> list[dict] | None:
        """Every attempt of the run (None without a tracker)."""
        import ray

        if self.tracker is None:
            return None
        try:
            return ray.get(self.tracker.snapshot.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001
            log.warning("progress tracker did not answer (%s); retries are not counted", e)
            return None


INTERRUPTED = ("lost", "running", "stuck")  # attempt states that ended without a result


def summarize(attempts: list[dict] | None, rows_by_unit: dict[str, int], dead: set[str] = frozenset()) -> dict:
    """Per unit: attempts, rows run again, why (`dead`: dead node ids). `rows_retried` counts all of
    a unit's rows for each attempt after the first; `node_lost`, attempts cut short by node death."""
    if attempts is None:
        return {"rows_retried": None, "retried": {}}
    by_unit: dict[str, list[dict]] = {}
    for a in sorted(attempts, key=lambda a: a.get("started_at", 0)):
        by_unit.setdefault(a["unit"], []).append(a)
    retried, rows = {}, 0
    for unit, tries in by_unit.items():
        if len(tries) > 1:
            n = rows_by_unit.get(unit, tries[0].get("rows", 0))
            rows += n * (len(tries) - 1)
            retried[unit] = {"attempts": len(tries), "rows": n,
                             "node_lost": sum(1 for a in tries if node_lost(a, dead)),
                             "why": [_why(a, dead) for a in tries if a["state"] != "done"]}
    return {"rows_retried": rows, "retried": retried}


def node_lost(a: dict, dead: set[str]) -> bool:
    """Did this attempt end without a result because its node died?"""
    return a["state"] in ("lost", "running") and a.get("node_id") in dead


def _why(a: dict, dead: set[str] = frozenset()) -> str:
    state = a["state"]
    where = f"actor {a.get('actor_id')} pid {a.get('pid')} on node {a.get('node_id')}"
    if node_lost(a, dead):
        return f"node lost: its node died after {a.get('rows_done', 0)} rows ({where})"
    if state == "stuck":
        return f"stuck: {a.get('error')} ({where}); killed and restarted"
    if state in ("lost", "running"):
        return f"replica died after {a.get('rows_done', 0)} rows ({where})"
    return f"{state}: {a.get('error')}"
