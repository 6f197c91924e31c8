"""The run report (`_run_report.json`, README: Nothing lost), from one `UnitStats` per unit: sent
by its replica, or read back from an output committed earlier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from .errors import one_line
from .settings import PipelineConfig
from .plan import Plan
from .progress import INTERRUPTED, node_lost, summarize
from .stages import TASKS


@dataclass
class UnitStats:
    """What one unit came to. `status`: done (committed now), skipped (committed earlier) or failed."""

    status: str = "failed"
    input: str = ""
    output: str = ""
    rows_in: int = 0
    rows_out: int = 0
    rows_error: int = 0
    errors_by_kind: dict = field(default_factory=dict)
    tokens_prompt: int = 0
    tokens_generated: int = 0
    seconds: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    load_seconds: float | None = None
    replica_created_at: float | None = None
    io_retries: int = 0
    error: str | None = None
    run_id: str | None = None
    node_id: str | None = None
    actor_id: str | None = None
    pid: int | None = None
    engine: dict | None = None
    extra: dict = field(default_factory=dict)  # the rest (fingerprints, settings, the task's `tally`), as read

    @classmethod
    def from_dict(cls, d: dict) -> "UnitStats":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    @property
    def committed(self) -> bool:
        return self.status in ("done", "skipped")


def unit_line(st: UnitStats) -> str:
    """The driver's one-line summary of a finished unit."""
    if st.status == "failed":
        return st.error or ""
    tokens = f"{st.tokens_generated} tokens, " if st.tokens_generated else ""
    return f"{st.rows_out} rows, {st.rows_error} with error, {tokens}{st.seconds:.1f} s"


def build_report(config: PipelineConfig, plan: Plan, results: dict, crash: str | None,
                 started_at: float, wall: float, run_id: str | None = None,
                 attempts: list[dict] | None = None, stuck: list[dict] | None = None,
                 dead: set[str] | None = None, planned: bool = True) -> dict:
    """The `_run_report.json` content. `results`: output name -> the stats replicas sent;
    `attempts`, `stuck`: from the progress tracker; `dead`: ids of Ray nodes dead at the end. A run
    stopped before its plan was made (`planned` False, an empty `plan`) is never complete."""
    dead = dead or set()
    units: dict[str, UnitStats] = {name: dataclasses.replace(UnitStats.from_dict(st), status="skipped")
                                   for name, st in plan.done.items()}
    received = {name: raw if isinstance(raw, UnitStats) else UnitStats.from_dict(raw) for name, raw in results.items()}
    for name, st in received.items():
        if st.status == "skipped" and run_id and st.run_id == run_id:
            st = dataclasses.replace(st, status="done")  # committed by an attempt of this run that then died
        units[name] = st
    retries = summarize(attempts, {u.output_name: u.num_rows for u in plan.units}, dead)
    failed = [{"input": u.input_uri, "output": u.output_name,
               "error": one_line((units[u.output_name].error if u.output_name in units else None) or crash
                                 or _lost_error(config, attempts, u.output_name))}
              for u in plan.units if not (u.output_name in units and units[u.output_name].committed)]
    committed = [st for st in units.values() if st.committed]
    ran = [st for st in units.values() if st.status == "done"]
    kinds: Counter = Counter()
    for st in committed:
        kinds.update(st.errors_by_kind)
    rows_in = sum(u.num_rows for u in plan.units) + sum(b["rows"] or 0 for b in plan.bad_inputs)
    rows_written = sum(st.rows_out for st in committed)
    tokens_now = sum(st.tokens_generated for st in ran)
    first_start = min((st.started_at for st in ran if st.started_at), default=None)
    created = [st.replica_created_at for st in ran if st.replica_created_at]
    complete = planned and not failed and rows_written == rows_in and all(b["rows"] == 0 for b in plan.bad_inputs)
    inputs = {u.output_name: u.input_uri for u in plan.units}
    return {
        "task": config.task,
        "complete": complete,
        "output": plan.output.uri,
        "rows_in": rows_in,
        "rows_written": rows_written,
        "rows_with_error": sum(st.rows_error for st in committed),
        "errors_by_kind": dict(kinds),
        "rows_retried": retries["rows_retried"],
        "ids": plan.ids or {"checked": False},
        "tokens_prompt": sum(st.tokens_prompt for st in committed),
        "tokens_generated": sum(st.tokens_generated for st in committed),
        "wall_time_s": round(wall, 3),
        "tokens_per_s": round(tokens_now / wall, 2) if wall > 0 else None,
        "this_run": {
            "run_id": run_id,
            "rows_processed": sum(st.rows_out for st in ran),
            "tokens_generated": tokens_now,
            "startup_s": round(first_start - started_at, 3) if first_start else None,
            "replica_start_s": round(min(created) - started_at, 3) if created else None,
            "model_load_s": max((st.load_seconds or 0 for st in ran), default=None),
            "replicas": len({st.actor_id for st in ran}),
            "units_per_node": {str(k): v for k, v in Counter(st.node_id for st in ran).items()},
            "storage_redos": sum(st.io_retries for st in received.values()),
        },
        "engine": engine_report(ran),
        **TASKS[config.task].report(config, {n: st for n, st in units.items() if st.committed}, plan),
        "units": {"total": len(plan.units) + len(plan.bad_inputs), "done": len(ran),
                   "skipped": len(committed) - len(ran), "failed": len(failed), "bad": len(plan.bad_inputs),
                   "stale": len(plan.stale)},
        "stale_units": plan.stale,
        "failed_units": failed,
        "retried_units": [{"output": k, "input": inputs.get(k), **v} for k, v in retries["retried"].items()],
        "replicas": replica_report(attempts, ran, dead),
        "nodes_lost": nodes_lost_report(attempts, retries["retried"], dead),
        "stuck_replicas": [{k: ev.get(k) for k in ("unit", "actor_id", "node_id", "pid", "rows_done", "silent_s")}
                           for ev in stuck or []],
        "bad_inputs": plan.bad_inputs,
        "error": one_line(crash),
        "config": config.public_dict(),
        "started_at": started_at,
        "finished_at": time.time(),
        "versions": _versions(),
    }


def replica_report(attempts: list[dict] | None, ran: list[UnitStats], dead: set[str]) -> list[dict]:
    """One entry per replica process of this run (fields: README, Nothing lost); a process whose
    actor restarted later `died`. Without the tracker's attempts: from `ran`, `ended` null."""
    tracked = attempts is not None
    if not tracked:  # each committed unit as one finished attempt
        attempts = [{"node_id": st.node_id, "actor_id": st.actor_id, "pid": st.pid, "state": "done",
                     "rows_done": st.rows_out, "tokens": st.tokens_generated, "seconds": st.seconds} for st in ran]
    by: dict[tuple, dict] = {}
    first: dict[tuple, float] = {}  # replica -> when it opened its first attempt
    last: dict[tuple, dict] = {}  # replica -> its latest attempt
    for a in sorted(attempts, key=lambda a: a.get("started_at", 0)):
        key = (a.get("node_id"), a.get("actor_id"), a.get("pid"))
        r = by.setdefault(key, {"node_id": key[0], "actor_id": key[1], "pid": key[2], "units": 0, "rows": 0,
                                "tokens": 0, "seconds": 0.0, "units_interrupted": 0, "rows_interrupted": 0,
                                "stuck": False, "ended": None})
        first.setdefault(key, a.get("started_at", 0))
        last[key] = a
        r["seconds"] = round(r["seconds"] + a.get("seconds", 0.0), 3)
        if a["state"] == "done":
            r.update(units=r["units"] + 1, rows=r["rows"] + a.get("rows_done", 0),
                     tokens=r["tokens"] + a.get("tokens", 0))
        elif a["state"] in INTERRUPTED:
            r.update(units_interrupted=r["units_interrupted"] + 1,
                     rows_interrupted=r["rows_interrupted"] + a.get("rows_done", 0),
                     stuck=r["stuck"] or a["state"] == "stuck")
    if not tracked:
        return list(by.values())
    for key, r in by.items():
        cut = last[key]["state"] in INTERRUPTED
        restarted = any(other[1] == key[1] and other != key and first[other] > first[key]
                        for other in by)  # its actor has a later process: this one ended
        r["ended"] = ("node_lost" if key[0] in dead else "died") if cut or restarted else "finished"
    return sorted(by.values(), key=lambda r: (str(r["node_id"]), str(r["actor_id"]), r["pid"] or 0))


def nodes_lost_report(attempts: list[dict] | None, retried: dict, dead: set[str]) -> dict:
    """The nodes that died under this run's replicas, and the units run again because of it."""
    lost = sorted({a.get("node_id") for a in attempts or [] if node_lost(a, dead)})
    units = [name for name, r in retried.items() if r.get("node_lost")]
    return {"nodes": lost, "units_retried": len(units),
            "rows_retried": sum(retried[name]["rows"] * retried[name]["node_lost"] for name in units)}


def engine_report(ran: list[UnitStats]) -> dict:
    """Each replica's engine sizing and counters (its latest unit's: they add up over its life), and
    the totals a user sizes the next job with."""
    latest: dict = {}
    for st in ran:
        key = (st.node_id, st.actor_id, st.pid)
        if st.engine and (key not in latest or (st.finished_at or 0) >= latest[key][0]):
            latest[key] = (st.finished_at or 0, {"node_id": key[0], "actor_id": key[1], "pid": key[2], **st.engine})
    replicas = [v for _, v in latest.values()]
    if not replicas:
        return {"replicas": []}

    def pick(fn, name):
        return fn((r[name] for r in replicas if name in r), default=None)

    return {
        "replicas": replicas,
        "preemptions": sum(r.get("preemptions", 0) for r in replicas),
        "kv_tokens_capacity": pick(min, "kv_tokens_capacity"),
        "kv_tokens_peak": pick(max, "kv_tokens_peak"),
        "rows_in_flight_peak": pick(max, "rows_in_flight_peak"),
    }


def _lost_error(config: PipelineConfig, attempts: list | None, unit: str) -> str:
    """Why a unit has no result although its task was scheduled: its replica kept dying."""
    tries = [a for a in attempts or [] if a.get("unit") == unit]
    stuck = [a for a in tries if a.get("state") == "stuck"]
    given_up = f"gave up after max_unit_retries={config.max_unit_retries}"
    if stuck:
        return (f"stuck: no batch finished within batch_timeout_s={config.batch_timeout_s:g} on "
                f"{len(stuck)} of {len(tries)} attempt(s); each stuck replica was killed and restarted; "
                f"{given_up}")
    if tries:
        return (f"replica_died: its replica died during all {len(tries)} attempt(s) (OOM, segfault, "
                f"killed or node lost; see the Ray logs); {given_up}")
    return f"no result: the task never ran to completion ({given_up}; see the Ray logs)"


def _versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for mod in ("ray", "pyarrow", "torch"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    return out


def summary(report: dict) -> str:
    """The run report in a few lines: what the CLI prints at the end of a run."""
    s, t = report["units"], report["this_run"]
    lines = [
        f"persimmon-batch {report['task']}: {'complete' if report['complete'] else 'INCOMPLETE'}",
        f"  rows    {report['rows_in']} in, {report['rows_written']} written, "
        f"{report['rows_with_error']} with error" + (f" {report['errors_by_kind']}" if report["errors_by_kind"] else ""),
        f"  units   {s['done']} done, {s['skipped']} already committed, {s['failed']} failed, {s['bad']} bad",
        *_fault_lines(report),
        f"  time    {report['wall_time_s']:.1f} s wall, startup {t['startup_s'] or 0:.1f} s"
        + (f", {t['tokens_generated']} tokens generated ({report['tokens_per_s']} tok/s)"
           if TASKS[report["task"]].generates else ""),
        f"  output  {report['output']}  (report: _run_report.json)",
    ]
    if report.get("labels"):
        lab = report["labels"]
        hist = ", ".join(f"{k} {v}" for k, v in lab["histogram"].items())
        lines.insert(3, f"  labels  {hist}; {lab['low_margin_rows']} row(s) with margin < {lab['low_margin']:g}"
                        + (" (calibrated)" if lab["calibrated"] else ""))
    stopped = report.get("error")  # why the run stopped early: every unit it left undone says the same
    if stopped:
        lines.append(f"  ! {stopped}")
    for item in [i for i in report["failed_units"] + report["bad_inputs"] if i["error"] != stopped][:10]:
        lines.append(f"  ! {item['input']}: {item['error']}")
    return "\n".join(lines)


def _fault_lines(report: dict) -> list[str]:
    lines = []
    ids = report.get("ids") or {}
    if ids.get("duplicate_rows") or ids.get("null_ids"):
        lines.append(f"  ids     {ids.get('duplicate_rows', 0)} row(s) repeat an earlier id "
                     f"({ids.get('duplicate_ids', 0)} distinct), {ids.get('null_ids', 0)} null: "
                     f"those rows have error set")
    if report.get("rows_retried"):
        lines.append(f"  retried {report['rows_retried']} row(s) run again in "
                     f"{len(report.get('retried_units') or [])} unit(s) after a replica died or stalled")
    lost = report.get("nodes_lost") or {}
    if lost.get("nodes"):
        lines.append(f"  nodes   {len(lost['nodes'])} lost mid-run ({', '.join(n[:12] for n in lost['nodes'][:3])}); "
                     f"{lost['units_retried']} unit(s), {lost['rows_retried']} row(s) run again elsewhere")
    replicas = report.get("replicas") or []
    if replicas:
        ended = Counter(r.get("ended") or "unknown" for r in replicas)
        nodes = len({r.get("node_id") for r in replicas})
        lines.append(f"  replicas {len(replicas)} on {nodes} node(s): "
                     + ", ".join(f"{n} {how.replace('_', ' ')}" for how, n in sorted(ended.items())))
    for ev in (report.get("stuck_replicas") or [])[:5]:
        lines.append(f"  ! stuck replica {ev['actor_id']} (pid {ev['pid']}) on {ev['unit']}: no batch for "
                     f"{ev['silent_s']} s; killed and restarted")
    return lines
