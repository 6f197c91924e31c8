"""UnitRunner: the Ray actor class that turns work units into committed output files.

The *input file* (or a slice) is the unit of work, retry and resume, not Ray Data's blocks (why:
README, Nothing lost); Ray Data still schedules:

    from_items(units) -> map_batches(UnitRunner, ActorPoolStrategy(min, max), num_gpus=g)

A unit streams through the stage into a temp file under `<output>/_tmp/`, committed atomically
under a name derived from the input (`storage.commit`). A unit whose output exists is skipped
(planning a rerun; Ray retrying a unit whose actor died after committing it): every row lands
exactly once. Results are deterministic (greedy, or seeded per row id), so a retried unit writes
the same rows. Each output's footer holds the unit's statistics.

What can go wrong in a replica, and what happens:
- it cannot start (model does not load, no CUDA, no room for its KV cache): the constructor
  does not raise (Ray would print every replica's traceback and retry); it logs the traceback
  and answers each unit `replica_start_failed: <type>: <message> (traceback in <its log>)`,
  on which the driver stops the run;
- a bad row: returned with `error_kind` and `error`; rows the plan flagged get their error unrun;
- a storage error mid-stream: the unit is redone from its start, up to `io_retries` times, then
  reported failed naming the URI;
- the replica dies (OOM, segfault, killed) or is killed as stuck (`pipeline.progress`): Ray
  restarts the actor and reruns the unit, up to `max_unit_retries`; each attempt is recorded.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import time
import uuid
from collections import Counter

import pyarrow as pa

from .settings import PipelineConfig
from .formats import INPUT_FORMATS, OUTPUT_FORMATS
from .errors import one_line
from .plan import Unit, read_unit_stats, result_config
from .metrics import ReplicaMetrics
from .progress import Attempts
from .stages import TASKS
from .storage import (Location, commit, ensure_dir, exists, naming, resolve, retry, temp_sibling, transient,
                      write_bytes_atomic)

log = logging.getLogger(__name__)


def _where() -> dict:
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "pid": os.getpid()}
    except Exception:  # noqa: BLE001
        pass
    return {"node_id": None, "actor_id": None, "pid": os.getpid()}


def _start_error(e: Exception) -> str:
    """Log why this replica cannot start, with the traceback; return it in one line naming the log
    file and the node's address."""
    log.error("this replica cannot start", exc_info=e)
    where = ""
    try:
        import ray
        from ray._private.worker import global_worker

        if ray.is_initialized() and global_worker.get_err_file_path():
            where = f" (traceback in {global_worker.get_err_file_path()} on {ray.util.get_node_ip_address()})"
    except Exception:  # noqa: BLE001 - private API: the message goes without the path
        pass
    return f"replica_start_failed: {type(e).__name__}: {one_line(str(e))}{where}"


def _close_quietly(stream) -> None:
    """Close after an error without hiding it (a second close is a no-op)."""
    with contextlib.suppress(Exception):
        stream.close()


class UnitRunner:
    """For `map_batches`: JSON `unit` rows in, JSON `stats` (done / skipped / failed) out.
    `engine`: for tests; `progress`: the run's ProgressTracker."""

    def __init__(self, config: PipelineConfig, schema: pa.Schema, engine=None, progress=None,
                 run_id: str | None = None):
        self.created_at = time.time()  # the replica process is up (before the model loads)
        self.config = config
        self.schema = schema
        self.where = _where()
        self.start_error: str | None = None
        try:
            self.stage = TASKS[config.task](config, engine=engine)
        except Exception as e:  # noqa: BLE001 - told to the driver with each unit, in one line
            self.stage, self.start_error = None, _start_error(e)
        self.output = resolve(config.output, config)
        self.result_config = result_config(config)
        self.run_id = run_id or uuid.uuid4().hex
        self.attempts = Attempts(progress, self.where)
        self.metrics = ReplicaMetrics(config.task)

    def __call__(self, batch) -> dict:
        units = batch["unit"]
        units = units.to_pylist() if hasattr(units, "to_pylist") else list(units)
        return {"stats": [json.dumps(self.run_unit(Unit.from_json(u))) for u in units]}

    def run_unit(self, unit: Unit) -> dict:
        """Process and commit one unit; never raises. A storage error redoes it (`io_retries`), others fail it."""
        final = self.output.join(unit.output_name)
        base = {"input": unit.input_uri, "output": final.uri, "rows_in": unit.num_rows, **self.where}
        if self.start_error is not None:  # no engine here: nothing can run
            return {**base, "status": "failed", "error": self.start_error, "replica_start_failed": True}
        try:
            existing = read_unit_stats(final) if exists(final) else None
        except Exception as e:  # noqa: BLE001 - storage down: report, go on
            return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}"}
        if existing is not None and existing.get("input_fingerprint") == unit.fingerprint \
                and existing.get("result_config") == self.result_config:
            return {**existing, **base, "status": "skipped"}  # committed by an earlier attempt (`run_id` says whose)
        tries = 0

        def run_once() -> dict:
            nonlocal tries
            tries += 1
            attempt = self.attempts.start(unit.output_name, unit.num_rows)
            try:
                stats = self._process(unit, final, attempt)
            except Exception as e:
                state = "io_error" if transient(e) else "failed"
                self.attempts.end(attempt, state, f"{type(e).__name__}: {e}")
                raise
            self.attempts.end(attempt, "done")
            return stats

        try:  # a storage error mid-stream redoes the unit from its start, as any storage call is redone
            stats = retry(run_once, f"unit {unit.output_name}", self.config.io_retries)
        except Exception as e:  # noqa: BLE001 - storage failure, corrupt data: report, go on
            log.error("unit %s failed: %s", unit.output_name, e)
            return {**base, "status": "failed", "error": f"{type(e).__name__}: {e}", "io_retries": tries - 1}
        return {**stats, **base, "status": "done", "io_retries": tries - 1}

    def _process(self, unit: Unit, final: Location, attempt: str) -> dict:
        cfg = self.config
        src = resolve(unit.input_uri, cfg)
        writer_format = OUTPUT_FORMATS[cfg.output_format]
        tmp = temp_sibling(final)
        ensure_dir(tmp.parent)
        writing = f"write {final.uri} (temp file _tmp/{tmp.path.rsplit('/', 1)[-1]})"
        preset = sorted((int(i), error) for i, error in unit.row_errors)
        preset_rows = [i for i, _ in preset]
        started, t0 = time.time(), time.perf_counter()
        engine_before = self.stage.engine_seconds
        read_s = write_s = 0.0
        rows = tok_in = tok_out = 0
        kinds: Counter = Counter()  # row errors by kind
        task_totals: dict = {}  # what the task's report adds (label: the label histogram)
        try:
            with contextlib.ExitStack() as stack:
                with naming(f"read {src.uri}"):
                    batches = INPUT_FORMATS[unit.input_format].batches(src, unit.split, cfg,
                                                                        TASKS[cfg.task].read_columns(cfg))
                with naming(writing):
                    f_out = tmp.fs.open_output_stream(tmp.path)
                    stack.callback(_close_quietly, f_out)  # on errors only: closed below on success
                    writer = writer_format.open(f_out, self.schema, cfg)
                    if hasattr(writer, "close"):  # Parquet's: closed before the stream on errors
                        stack.callback(_close_quietly, writer)
                while True:
                    t_read = time.perf_counter()
                    with naming(f"read {src.uri}"):
                        item = next(batches, None)
                    read_s += time.perf_counter() - t_read
                    if item is None:
                        break
                    batch, read_errors = item
                    lo, hi = bisect.bisect_left(preset_rows, rows), bisect.bisect_left(preset_rows, rows + batch.num_rows)
                    # a line that could not be read says why; the plan's id checks come second
                    row_errors = {**{i - rows: error for i, error in preset[lo:hi]}, **read_errors}
                    t_batch = time.perf_counter()
                    out = self.stage(batch, row_errors).cast(self.schema)
                    t_write = time.perf_counter()
                    with naming(writing):
                        writer.write(out)
                    write_s += time.perf_counter() - t_write
                    rows += out.num_rows
                    batch_kinds = Counter(k for k in out["error_kind"].to_pylist() if k is not None)
                    kinds.update(batch_kinds)
                    self.stage.tally(task_totals, out)
                    batch_tokens = 0
                    if "num_prompt_tokens" in out.column_names:
                        tok_in += sum(x or 0 for x in out["num_prompt_tokens"].to_pylist())
                        batch_tokens = sum(x or 0 for x in out["num_generated_tokens"].to_pylist())
                        tok_out += batch_tokens
                    self.attempts.beat(attempt, rows, tok_out, kinds.total())
                    self.metrics.batch(out.num_rows, batch_tokens, batch_kinds, time.perf_counter() - t_batch)
                if rows != unit.num_rows:
                    raise RuntimeError(f"read {rows} rows from {unit.input_uri}, the plan counted {unit.num_rows}")
                stats = {
                    "rows_out": rows, "rows_error": kinds.total(), "errors_by_kind": dict(kinds),
                    "tokens_prompt": tok_in, "tokens_generated": tok_out,
                    "seconds": round(time.perf_counter() - t0, 4), "started_at": started,
                    # where the unit's time went: the engine, reading, writing (the rest: the
                    # stage's column conversions, heartbeats, metrics)
                    "engine_seconds": round(self.stage.engine_seconds - engine_before, 4),
                    "read_seconds": round(read_s, 4), "write_seconds": round(write_s, 4),
                    "finished_at": time.time(), "load_seconds": round(self.stage.load_seconds, 3),
                    "replica_created_at": self.created_at,
                    "row_groups": unit.row_groups, "result_config": self.result_config,
                    "input_fingerprint": unit.fingerprint,
                    "run_id": self.run_id, "engine": self.stage.engine_stats(), **task_totals,
                }
                with naming(writing):
                    side_bytes = writer.finish(stats)
                    f_out.close()
            self.attempts.beat(attempt, rows, tok_out, kinds.total())
            commit(tmp, final)
            if side_bytes is not None:  # formats without a footer: statistics in a sidecar, written
                # after the data, so a sidecar never describes data that is not there yet (an old
                # file of the same size); until it lands, the old sidecar's fingerprint (or none)
                # leaves the new data file uncommitted, and a rerun redoes it
                with naming(writing):
                    sidecar = writer_format.sidecar(final)
                    ensure_dir(sidecar.parent)
                    write_bytes_atomic(sidecar, side_bytes)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort; temp files are hidden
                tmp.fs.delete_file(tmp.path)
            raise
        return stats
