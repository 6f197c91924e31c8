"""Python API: run a task end to end, exactly once and resumable (`pipeline.unit_runner`):

    from pipeline import run_generate
    report = run_generate(input="s3://b/prompts/", output="s3://b/out/", model="/models/p8b")

`pipeline.processor` (lazy Datasets) shares this module's driver checks, Ray and replica pool.
"""

from __future__ import annotations

import contextlib
import gc
import dataclasses
import json
import logging
import os
import time
import uuid
from collections import Counter

from .settings import PipelineConfig
from .console import Console, quiet_ray
from .attachments import check_prefix_length, load_attachments
from .autoscale import ReplicaDemand
from .hub import pin
from .errors import ConfigError, one_line
from .modelcheck import check_model, model_identity
from .plan import REPORT_NAME, Plan, describe, make_plan, summary_lines
from .prompt_stats import SAMPLE_ROWS, prompt_stats
from .placement import check_device, check_room, local_resources
from .progress import INTERRUPTED, Watchdog, dead_nodes, start_tracker
from .report import UnitStats, build_report, unit_line
from .unit_runner import UnitRunner
from .signals import StopSignals
from .lease import Lease
from .storage import ensure_dir, resolve, write_bytes_atomic

log = logging.getLogger(__name__)


# ---- Ray ------------------------------------------------------------------------------------
def init_ray(config: PipelineConfig) -> bool:
    """Join `ray_address` or RAY_ADDRESS (set in `ray job submit` jobs), else start a local Ray on
    127.0.0.1 with `placement.local_resources`; replica output stays in Ray's logs unless `verbose`.
    Returns True when this call started or joined Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=config.verbose)
        return True
    # Loopback only: Ray binds to the machine's address unless multi-node support is off while
    # ray.init spawns the GCS and raylet. Token auth would write ~/.ray/auth_token, which later
    # local heads then insist on (RAY.md): off unless the user set RAY_AUTH_MODE.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    resources = local_resources(config)
    with _loopback_only():
        ray.init(address="local", num_cpus=resources["CPU"], num_gpus=resources["GPU"], include_dashboard=False,
                 configure_logging=True, logging_level=logging.WARNING, log_to_driver=config.verbose)
    return True


@contextlib.contextmanager
def _loopback_only():
    """Ray's multi-node support off for the block (as on macOS / Windows), then restored for later
    connections to real clusters."""
    from ray._private import ray_constants

    env_key = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(env_key), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env_key] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = saved_env


def _pool_size(config: PipelineConfig, max_units: int | None = None, min_replicas: int | None = None) -> tuple[int, int]:
    """(MIN, MAX) replicas of the pool for `max_units` units."""
    lo, hi = config.replica_range
    if min_replicas is not None:  # a retry round: go on with what the cluster still has
        lo = min(lo, min_replicas)
    if max_units is not None:  # never start replicas that would have nothing to do
        hi = max(1, min(hi, max_units))
        lo = min(lo, hi)
    return lo, hi


def _compute(config: PipelineConfig, max_units: int | None = None, min_replicas: int | None = None):
    import ray.data

    lo, hi = _pool_size(config, max_units, min_replicas)
    # one unit at a time per actor: one queued behind a busy actor would leave others idle
    per_actor = 1 if max_units is not None else None
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=per_actor)


def _context_values(config: PipelineConfig, ctx, **extra) -> dict:
    """The DataContext settings of a replica pool, over those of `ctx`."""
    return {
        "enable_progress_bars": bool(config.progress and config.verbose),
        # wait for the minimum pool: replicas that cannot be placed (no GPU node) are an error
        # after the timeout, not a silent hang
        "wait_for_min_actors_s": config.replica_start_timeout_s or -1,
        # Ray's upscaling threshold 1.75 needs 2 tasks queued per actor, but each replica gets one
        # unit at a time: grow when every replica is busy, shrink only once all units are out
        "autoscaling_config": dataclasses.replace(ctx.autoscaling_config, actor_pool_util_upscaling_threshold=1.0,
                                                  actor_pool_util_downscaling_threshold=0.0),
        **extra,
    }


@contextlib.contextmanager
def _data_context(config: PipelineConfig, **extra):
    """`_context_values` for the Datasets created inside the block only (Ray Data snapshots the
    context at creation, RAY.md): the user's own Datasets keep theirs."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    values = _context_values(config, ctx, **extra)
    saved = {k: getattr(ctx, k) for k in values}
    for k, v in values.items():
        setattr(ctx, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def _map_batches(ds, fn, config: PipelineConfig, **kwargs):
    """`ds.map_batches(fn)` on the replica pool with this config's resources and retries."""
    import warnings

    if config.num_gpus_per_replica:
        kwargs["num_gpus"] = config.num_gpus_per_replica
    with warnings.catch_warnings():
        # max_task_retries only goes through the deprecated **ray_remote_args (RAY.md); without
        # it a batch that kills its actor every time would be retried forever
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(fn, num_cpus=config.num_cpus_per_replica,
                              max_task_retries=config.max_unit_retries, **kwargs)


def _check_shared_stores(config: PipelineConfig) -> None:
    """Replicas run in other Ray processes: a store private to this process cannot work there."""
    from urllib.parse import urlparse

    for name in ("input", "output", "model"):
        value = getattr(config, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and urlparse(item).scheme == "memory":
                raise ConfigError(f"{name}: {item} is fsspec's in-memory store, private to this process; Ray "
                                  "replicas run in other processes and would find it empty. Use a store every "
                                  "node reaches (s3://, gs://, abfs://, a shared disk); memory:// works only "
                                  "with pipeline.unit_runner.UnitRunner called in this process")


def filesystem(config: PipelineConfig, uri: str):
    """(pyarrow filesystem, path) for a URI, configured from `config` (endpoint, region)."""
    loc = resolve(uri, config.with_env())
    return loc.fs, loc.path


# ---- the exactly-once run -----------------------------------------------------------------
def _checked(config: PipelineConfig, run: bool = True) -> PipelineConfig:
    """The config after every check that needs no input file (settings, attachments, shared
    stores, the model pinned and checked, its identity); `run=False`: a processor's."""
    config = load_attachments(config.with_env().validate(run=run))
    _check_shared_stores(config)
    config = pin(config)  # a hub id: resolved here, once; replicas load this commit
    check_model(config)
    check_prefix_length(config)
    check_device(config)
    return dataclasses.replace(config, model_identity=model_identity(config))


def dry_run(config: PipelineConfig, sample_rows: int = SAMPLE_ROWS) -> dict:
    """What `run(config)` would do (`persimmon-batch plan`): its checks before the first replica,
    the plan's numbers and the prompt lengths of `sample_rows` rows (0: all), as `describe`'s
    dict. Writes nothing, deletes nothing (--overwrite) and starts no Ray."""
    config = _checked(config)
    plan = make_plan(config, write=False)
    if plan.todo:  # a pool local Ray cannot hold: refused as `run` refuses it, before Ray starts
        check_room(config, _pool_size(config, len(plan.todo))[0])
    holder = Lease(plan.output, run_id="plan").live_holder()
    return describe(config, plan, prompt_stats(config, plan, sample_rows), holder)


def run(config: PipelineConfig) -> dict:
    """Run `config.task` over all inputs, commit one output per unit, write and return the
    run report. Safe to rerun: committed units are skipped (`resume`, on by default). One run
    per output at a time (`pipeline.lease`); SIGTERM / SIGINT stop it with a report."""
    t_start, started_at = time.perf_counter(), time.time()
    config = _checked(config)
    run_id = uuid.uuid4().hex[:12]
    with StopSignals() as stop, Lease(resolve(config.output, config), run_id) as lease, quiet_ray(config.verbose):
        stop.lease = lease
        return _run_planned(config, run_id, stop, t_start, started_at)


def _run_planned(config: PipelineConfig, run_id: str, stop: StopSignals, t_start: float, started_at: float) -> dict:
    console = Console(enabled=bool(config.progress))
    plan = stop.call("planning", make_plan, config)
    results: dict[str, dict] = {}
    crash, attempts, stuck, dead = None, None, [], set()
    if plan is not None:
        for line in summary_lines(describe(config, plan)):  # as `persimmon-batch plan`, less prompt lengths
            console.say(line)
        ensure_dir(plan.output)
        if plan.todo and not stop.signal:
            crash, attempts, stuck, dead = _run_on_ray(config, plan, run_id, stop, results, console)
    if stop.signal:
        what = ("no new units were started and units in flight were abandoned (their partial files are ignored)"
                if results or attempts else "no unit was started")
        crash = (f"interrupted by {stop.signal}" + (f" while {stop.phase}" if stop.phase else "")
                 + f": {what}; rerun the same command to finish")
        console.say(crash)
    planned = plan is not None
    if not planned:  # stopped while listing the inputs: nothing was run, nothing is counted
        plan = Plan(units=[], schema=None, output=resolve(config.output, config))
    if crash:  # units whose result never reached the driver may still have committed: count them
        _committed_meanwhile(config, plan, results, run_id)
    report = build_report(config, plan, results, crash, started_at, time.perf_counter() - t_start,
                          run_id=run_id, attempts=attempts, stuck=stuck, dead=dead, planned=planned)
    report["interrupted"] = stop.signal
    write_bytes_atomic(plan.output.join(REPORT_NAME), json.dumps(report, indent=2).encode())
    if report["complete"]:
        if stop.lease is not None:
            stop.lease.stop_renewing()  # else a heartbeat could make _tmp/ again as it is removed
        _clean_tmp(plan)
    return report


def _run_on_ray(config: PipelineConfig, plan: Plan, run_id: str, stop: StopSignals, results: dict,
                console: Console) -> tuple:
    """Start or join Ray, check there is room for the pool, run the units in rounds until each
    has a result or its attempts. Returns (why it stopped early or None, the tracker's attempts,
    stuck replicas, dead node ids)."""
    import ray

    replicas = _pool_size(config, len(plan.todo))[0]
    if not ray.is_initialized():
        check_room(config, replicas)  # local Ray: before it starts (a cluster: once joined, below)
    stop.call("starting Ray", init_ray, config, at_once=False)
    stop.reown()  # Ray's core worker put its C++ SIGTERM handler over ours (pipeline/signals.py)
    if stop.signal:
        return None, None, [], set()
    check_room(config, replicas)
    crash = None
    tracker = start_tracker(run_id)
    console.start(sum(u.num_rows for u in plan.todo))
    with Watchdog(tracker, config.batch_timeout_s, console.say) as watchdog, console.live(tracker):
        units, round_ = plan.todo, 0
        while units:
            crash = _run_units(config, plan, units, round_, tracker, run_id, stop, results, console)
            if crash or stop.signal or round_ >= config.max_unit_retries:
                break
            units = _given_up(config, plan, results, run_id, watchdog.attempts())
            round_ += 1
            if units:
                console.say(f"{len(units)} unit(s) came back without a result (Ray gave up on their tasks, e.g. "
                    f"their replica's node was lost); running them again: {', '.join(u.output_name for u in units)}")
        attempts, stuck = watchdog.attempts(), watchdog.events
    # tells node losses from replica deaths: is the node of each cut-short attempt still there?
    dead = dead_nodes({a.get("node_id") for a in attempts or [] if a["state"] in INTERRUPTED})
    ray.kill(tracker)
    return crash, attempts, stuck, dead


def _run_units(config: PipelineConfig, plan: Plan, units: list, round_: int, tracker, run_id: str,
               stop: StopSignals, results: dict, console: Console) -> str | None:
    """Run `units` on a replica pool, their statistics into `results`; returns why the run stopped
    early (None: finished, or a signal). Rounds after the first rerun the units that came back
    without a result on a pool of MIN 1, so that it starts on what is left of the cluster."""
    import ray.data

    min_replicas = 1 if round_ else None
    # a unit whose replica keeps dying must not stop the others: `_given_up` decides about it
    with _data_context(config, max_errored_blocks=-1):
        ds = ray.data.from_items([{"unit": u.to_json()} for u in units], override_num_blocks=len(units))
        ds = _map_batches(ds, UnitRunner, config,
                          fn_constructor_kwargs={"config": config, "schema": plan.schema,
                                                 "progress": tracker, "run_id": run_id},
                          batch_size=1, batch_format="pyarrow",
                          compute=_compute(config, len(units), min_replicas))
    crash = None
    # a MIN,MAX pool: the autoscaler adds nodes for MAX replicas, and may take them back after
    with ReplicaDemand(config, *_pool_size(config, len(units), min_replicas), run_id):
        rows = iter(ds.iter_rows())
        try:
            crash = stop.call("running replicas", _collect, rows, plan, results, console, stop.lease)
        except Exception as e:  # noqa: BLE001 - e.g. retries exhausted, a pool never placed: report what is left
            crash = one_line(f"{type(e).__name__}: {e}")
        finally:
            if hasattr(rows, "close"):
                rows.close()  # stops Ray Data's execution: replicas are released
            del rows, ds
            # the executor's handles sit in reference cycles: collected, a replica that never
            # opened an attempt (end_round kills the others by handle) ends now, not at some later GC
            gc.collect()
            try:  # release what the round's pool left behind (ProgressTracker.end_round)
                killed = ray.get(tracker.end_round.remote(), timeout=60)
                if killed:
                    log.info("round over: its %d replica(s) stopped", killed)
            except Exception as e:  # noqa: BLE001 - the tracker died with its node: nothing is held
                log.info("could not end the round on the progress tracker: %s", e)
    if crash:
        log.error("the run stopped: %s", crash)
    return crash


def _collect(rows, plan: Plan, results: dict, console: Console, lease) -> str | None:
    """Take each unit's statistics as they come. Returns why the run must stop early (None: all
    came back): a replica that could not start (the others would fail alike), or a lost lease."""
    for row in rows:
        st = json.loads(row["stats"])
        if st.get("replica_start_failed"):
            return st["error"]
        name = st["output"].rsplit("/", 1)[-1]
        results[name] = st
        console.unit_done(st)
        console.say(f"[{len(results)}/{len(plan.todo)}] {st['status']:7s} {name}: " + unit_line(UnitStats.from_dict(st)))
        if lease is not None and lease.lost:
            return f"lost the output's lease ({lease.lost}): stopped so that two runs do not write the same output"
    return None


def _given_up(config: PipelineConfig, plan: Plan, results: dict, run_id: str, attempts: list[dict] | None) -> list:
    """The units to run again after the Dataset finished without their result.

    Every restart of a unit's actor, or time it is unreachable (node lost, restart unplaceable),
    counts against the task's retries even if the unit never started. So a unit with no result
    is looked up in the output (its replica may have committed it), then rerun unless it had
    `max_unit_retries` + 1 attempts (one that kills its replica every time stays failed).
    Without the tracker's attempts nothing is rerun: rerunning the command does."""
    missing = [u for u in plan.todo if u.output_name not in results]
    if not missing or attempts is None:
        return []
    _committed_meanwhile(config, plan, results, run_id)
    tries = Counter(a["unit"] for a in attempts)
    return [u for u in missing if u.output_name not in results and tries[u.output_name] <= config.max_unit_retries]


def _committed_meanwhile(config: PipelineConfig, plan: Plan, results: dict, run_id: str) -> None:
    """A unit with no result whose output's footer says this run, this input and these settings
    was committed anyway (after a crash or a signal): done."""
    from .plan import read_unit_stats, result_config
    from .storage import exists

    want = result_config(config)
    for unit in plan.todo:
        if unit.output_name in results:
            continue
        final = plan.output.join(unit.output_name)
        try:
            st = read_unit_stats(final) if exists(final) else None
        except Exception:  # noqa: BLE001 - unknown stays unknown: reported failed, redone on rerun
            st = None
        if st and st.get("run_id") == run_id and st.get("input_fingerprint") == unit.fingerprint \
                and st.get("result_config") == want:
            results[unit.output_name] = {**st, "status": "done", "output": final.uri}


def _clean_tmp(plan: Plan) -> None:
    """Temp files of killed attempts (outputs' and JSONL statistics') after a complete run."""
    for tmp in (plan.output.join("_tmp"), plan.output.join("_stats", "_tmp")):
        with contextlib.suppress(OSError):
            plan.output.fs.delete_dir(tmp.path)


def _task_runner(task: str, what: str):
    def run_task(config: PipelineConfig | dict | None = None, **overrides) -> dict:
        if config is None:
            config = PipelineConfig(task=task, **overrides)
        elif isinstance(config, dict):
            config = PipelineConfig.from_dict({**config, "task": task}, **overrides)
        else:
            config = dataclasses.replace(config, task=task, **overrides)
        return run(config)

    run_task.__name__ = run_task.__qualname__ = f"run_{task}"
    run_task.__doc__ = f"`run` with task={task!r} ({what}); fields may be given as keyword arguments."
    return run_task


run_generate = _task_runner("generate", "text generation with a causal LM")
run_classify = _task_runner("classify", "a sequence-classification checkpoint")
run_label = _task_runner("label", "zero-shot labeling with a causal LM and `choices`")
run_score = _task_runner("score", "each text's log-likelihood and perplexity under a causal LM")
