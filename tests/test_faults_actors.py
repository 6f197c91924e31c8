"""Fault injection, part 2: replicas that die or hang, and a driver killed mid-run.

The tests hurt real processes of one local Ray (started once for the module):
- SIGKILL a replica in the middle of a shard: Ray restarts it, the shard is redone, every id
  lands exactly once and the report counts the rows run again;
- SIGKILL the replica of one shard on every attempt (an OOM or segfault on that data): after
  max_unit_retries the shard is reported failed while the others finish; a rerun completes it;
- SIGSTOP a replica (a wedged kernel or a hung call): the watchdog reports it after
  batch_timeout_s, kills it, and the shard is retried; a shard that hangs every time is
  reported failed instead of hanging the run;
- SIGKILL the driver (a CLI process) mid-run, rerun: committed shards are skipped untouched,
  the rest is computed, every id exactly once.

Which process to hit comes from the run's progress tracker (unit -> replica pid), so the fault
lands mid-shard by construction, not by timing luck.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import PROMPTS, TrackerWatch, assert_exactly_once, read_output, tiny_model

from model import Engine, SamplingParams
from pipeline import run_generate
from pipeline.cli import summary
from pipeline.stages import row_seed

pytestmark = pytest.mark.ray
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_KV_GIB = 12 * 16 * 1024 / 2**30  # 12 blocks of 16 tokens of the tiny model's fp32 KV (2 reserved)


def write_sized_shards(directory, sizes: list[int]) -> dict[str, list[int]]:
    """part-0000k.parquet with sizes[k] rows (ids numbered on); returns name -> ids."""
    os.makedirs(directory, exist_ok=True)
    out, start = {}, 0
    for k, n in enumerate(sizes):
        ids = list(range(start, start + n))
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()),
                                 "prompt": [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in ids]}),
                       os.path.join(directory, f"part-{k:05d}.parquet"))
        out[f"part-{k:05d}.parquet"] = ids
        start += n
    return out


def prompt_of(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} ({i})"


class ReplicaFaults(TrackerWatch):
    """Send a signal to the replica process working on a chosen unit, as the run goes.

    rules: unit name -> (signal, attempts to hit: a set of attempt numbers or None for every
    one, rows the attempt must have finished first). Polls the run's ProgressTracker (found by
    its name) every 20 ms; records every hit as (unit, attempt number, pid, signal)."""

    def __init__(self, rules: dict):
        super().__init__()
        self.rules = rules
        self.hits: list[tuple] = []
        self.stopped: list[int] = []
        self._acted: set = set()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for pid in self.stopped:  # never leave a frozen process behind
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def on_snapshot(self, attempts: list[dict]) -> bool:
        for a in attempts:
            if a["attempt"] in self._acted or a["state"] != "running" or a["unit"] not in self.rules:
                continue
            sig, which, after_rows = self.rules[a["unit"]]
            number = 1 + sum(1 for b in attempts if b["unit"] == a["unit"] and b["started_at"] < a["started_at"])
            if (which is None or number in which) and a["rows_done"] >= after_rows:
                self._acted.add(a["attempt"])
                try:
                    os.kill(a["pid"], sig)
                except ProcessLookupError:
                    continue
                if sig == signal.SIGSTOP:
                    self.stopped.append(a["pid"])
                self.hits.append((a["unit"], number, a["pid"], sig))
        return False


def file_state(directory) -> dict[str, tuple]:
    """{committed output file: (mtime_ns, sha256)}"""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".parquet"):
            path = os.path.join(directory, name)
            out[name] = (os.stat(path).st_mtime_ns, hashlib.sha256(open(path, "rb").read()).hexdigest())
    return out


# ---- replicas killed mid-shard -----------------------------------------------------------------
DEATH_SIZES = [6, 160, 64, 6]  # part-00001 is killed once, part-00002 on every attempt
SEED = 7


@pytest.fixture(scope="module")
def deaths(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("deaths")
    shards = write_sized_shards(str(root / "in"), DEATH_SIZES)
    kwargs = dict(input=str(root / "in"), output=str(root / "out"), model=tiny_model("causal"),
                  replicas=2, batch_size=8, max_num_seqs=4, max_new_tokens=12, max_unit_retries=1,
                  kv_cache_gib=TINY_KV_GIB, max_seq_len=160,  # the pool holds one row of 160 tokens
                  temperature=0.9, top_p=0.95, seed=SEED)  # sampled: a redo must draw the same
    rules = {"part-00001.parquet": (signal.SIGKILL, {1}, 8),      # after its first batch
             "part-00002.parquet": (signal.SIGKILL, None, 0)}     # as soon as it starts, always
    t0 = time.perf_counter()
    with ReplicaFaults(rules) as faults:
        report = run_generate(**kwargs)
    wall = time.perf_counter() - t0
    return {"root": root, "shards": shards, "kwargs": kwargs, "report": report, "hits": faults.hits,
            "wall": wall, "files": file_state(root / "out")}


def test_replica_killed_mid_shard_is_restarted_and_the_shard_redone(deaths):
    report, shards = deaths["report"], deaths["shards"]
    # the replicas ran on a KV pool of 10 usable blocks: a few rows at a time, the pool full
    eng = report["engine"]
    assert eng["kv_tokens_capacity"] == 10 * 16 and eng["kv_tokens_peak"] >= 0.75 * 10 * 16, eng
    assert eng["rows_in_flight_peak"] >= 2, eng
    assert [h[:2] for h in deaths["hits"] if h[0] == "part-00001.parquet"] == [("part-00001.parquet", 1)]
    retried = {r["output"]: r for r in report["retried_units"]}
    assert retried["part-00001.parquet"]["attempts"] == 2 and retried["part-00001.parquet"]["rows"] == 160
    assert retried["part-00001.parquet"]["why"][0].startswith("replica died after ")
    table = read_output(deaths["root"] / "out")
    done_ids = [i for name, ids in shards.items() if name != "part-00002.parquet" for i in ids]
    assert_exactly_once(table["id"].to_pylist(), done_ids)
    # the redone shard holds exactly what the engine draws for its prompts, each row with the
    # seed derived from the run's seed and its id: sampled, yet the redo after the kill equals
    # an undisturbed run
    part = pq.read_table(deaths["root"] / "out" / "part-00001.parquet")
    ids = shards["part-00001.parquet"]
    assert part["id"].to_pylist() == ids
    engine = Engine.from_pretrained(tiny_model("causal"), max_batch_size=2, device="cpu")
    direct = engine.generate([prompt_of(i) for i in ids],
                             [SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=row_seed(SEED, i))
                              for i in ids])
    assert part["completion"].to_pylist() == [c.text for c in direct]
    greedy = engine.generate([prompt_of(i) for i in ids[:20]], SamplingParams(max_new_tokens=12))
    assert [c.text for c in greedy] != part["completion"].to_pylist()[:20]  # the rows really were sampled


def test_shard_that_kills_its_replica_every_time_fails_alone(deaths):
    report = deaths["report"]
    assert [h[:2] for h in deaths["hits"] if h[0] == "part-00002.parquet"] == \
        [("part-00002.parquet", 1), ("part-00002.parquet", 2)]  # max_unit_retries=1: two attempts
    assert report["complete"] is False and report["error"] is None
    assert report["units"] == {"total": 4, "done": 3, "skipped": 0, "failed": 1, "bad": 0, "stale": 0}
    [failed] = report["failed_units"]
    assert failed["output"] == "part-00002.parquet" and failed["input"].endswith("in/part-00002.parquet")
    assert failed["error"].startswith("replica_died: its replica died during all 2 attempt(s)")
    assert "max_unit_retries=1" in failed["error"]
    assert report["rows_in"] == sum(DEATH_SIZES) and report["rows_written"] == sum(DEATH_SIZES) - 64
    assert report["rows_retried"] == 160 + 64  # each shard run twice, counted once per extra attempt
    assert "part-00002.parquet" not in deaths["files"]
    assert deaths["wall"] < 240  # generous: the run ended, it did not retry forever


def test_rerun_after_a_failed_shard_completes_it_and_skips_the_rest(deaths):
    out = deaths["root"] / "out"
    report = run_generate(**deaths["kwargs"])
    assert report["complete"] and report["units"]["done"] == 1 and report["units"]["skipped"] == 3
    assert report["this_run"]["rows_processed"] == 64 and report["rows_retried"] == 0
    after = file_state(out)
    assert {k: v for k, v in after.items() if k != "part-00002.parquet"} == deaths["files"]  # untouched
    all_ids = [i for ids in deaths["shards"].values() for i in ids]
    assert_exactly_once(read_output(out)["id"].to_pylist(), all_ids)
    assert not os.path.exists(out / "_tmp")  # temp files of the killed attempts cleaned up


# ---- stuck replicas ------------------------------------------------------------------------------
def test_stuck_replica_is_reported_killed_and_retried(ray_local, tmp_path):
    """SIGSTOP = a replica that stops making progress without dying. With batch_timeout_s=3 (a
    batch of 2 rows takes ~0.1 s, so a loaded machine does not reach it by accident) the
    watchdog kills it and Ray retries the shard; a shard that hangs on every attempt is
    reported failed (stuck) after max_unit_retries, and the run ends instead of hanging."""
    shards = write_sized_shards(str(tmp_path / "in"), [6, 160, 64, 6])
    rules = {"part-00001.parquet": (signal.SIGSTOP, {1}, 8),
             "part-00002.parquet": (signal.SIGSTOP, None, 0)}
    t0 = time.perf_counter()
    with ReplicaFaults(rules) as faults:
        report = run_generate(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model("causal"),
                              replicas=2, batch_size=2, max_new_tokens=12, max_unit_retries=1, batch_timeout_s=3)
    wall = time.perf_counter() - t0
    hits = faults.hits
    assert sorted(h[:2] for h in hits) == [("part-00001.parquet", 1), ("part-00002.parquet", 1),
                                           ("part-00002.parquet", 2)]
    stuck = report["stuck_replicas"]
    assert sorted((s["unit"], s["pid"]) for s in stuck) == sorted((h[0], h[2]) for h in hits)
    assert all(s["silent_s"] >= 3 for s in stuck), stuck
    assert report["units"]["done"] == 3 and report["units"]["failed"] == 1
    [failed] = report["failed_units"]
    assert failed["output"] == "part-00002.parquet"
    assert failed["error"].startswith("stuck: no batch finished within batch_timeout_s=3 on 2 of 2 attempt(s)")
    retried = {r["output"]: r for r in report["retried_units"]}
    assert retried["part-00001.parquet"]["attempts"] == 2 and "stuck" in retried["part-00001.parquet"]["why"][0]
    assert report["rows_retried"] == 160 + 64
    text = summary(report)  # what the CLI prints at the end
    assert "INCOMPLETE" in text and "224 row(s) run again in 2 unit(s)" in text
    assert text.count("! stuck replica") == 3 and "part-00002.parquet: stuck: no batch finished" in text
    table = read_output(tmp_path / "out")
    assert_exactly_once(table["id"].to_pylist(),
                        [i for name, ids in shards.items() if name != "part-00002.parquet" for i in ids])
    assert wall < 150, wall  # generous: only "it ended instead of hanging" is meant


# ---- the driver killed mid-run -------------------------------------------------------------------
def _foreign_actors_alive() -> list:
    import ray

    me = ray.get_runtime_context().get_job_id()
    return [a["ActorClassName"] for a in ray._private.state.actors().values()
            if a["JobID"] != me and a["State"] != "DEAD" and not a["IsDetached"]]  # not Ray Data's own


def test_driver_sigkill_mid_run_then_rerun_resumes_exactly_once(ray_local, tmp_path):
    import ray

    n_shards, rows = 8, 48
    shards = write_sized_shards(str(tmp_path / "in"), [rows] * n_shards)
    out = tmp_path / "out"
    args = dict(input=str(tmp_path / "in"), output=str(out), model=tiny_model("causal"), replicas=2,
                batch_size=2, max_new_tokens=16)
    port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--ray-address", f"127.0.0.1:{port}"] + [x for k, v in args.items()
                                                     for x in (f"--{k.replace('_', '-')}", str(v))]
    log_path = tmp_path / "driver.log"
    # single-node Ray on loopback: without this the driver swaps 127.0.0.1 for the host's address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": REPO, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    with open(log_path, "wb") as log:
        driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while len(file_state(out) if out.exists() else {}) < 2:
            assert driver.poll() is None, open(log_path, errors="replace").read()[-3000:]
            assert time.time() < deadline, open(log_path, errors="replace").read()[-3000:]
            time.sleep(0.01)
        at_kill = file_state(out)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == -signal.SIGKILL
    deadline = time.time() + 60  # Ray reaps the dead driver's replicas; wait for them to go
    while _foreign_actors_alive():
        assert time.time() < deadline, _foreign_actors_alive()
        time.sleep(0.2)
    before = file_state(out)
    assert all(before[name] == state for name, state in at_kill.items())
    assert 2 <= len(before) < n_shards, f"the kill came too late to test anything: {sorted(before)}"
    assert not (out / "_run_report.json").exists()
    # what a killed replica leaves behind, whether or not this kill left one: ignored, then removed
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "_part-00007.parquet.deadbeef").write_bytes(b"half a parquet file")

    report = run_generate(**args)
    assert report["complete"], report
    assert report["units"]["skipped"] == len(before) and report["units"]["done"] == n_shards - len(before)
    assert report["this_run"]["rows_processed"] == rows * (n_shards - len(before))
    after = file_state(out)
    assert {name: after[name] for name in before} == before  # finished shards not recomputed
    assert_exactly_once(read_output(out)["id"].to_pylist(), [i for ids in shards.values() for i in ids])
    saved = json.load(open(out / "_run_report.json"))
    assert saved["complete"] and saved["rows_written"] == saved["rows_in"] == rows * n_shards
    assert not (out / "_tmp").exists()
