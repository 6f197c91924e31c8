"""Fault injection, part 3: a flaky and a broken object store (moto on 127.0.0.1 behind an
error-injecting middleware), and credentials that must never leak.

- Transient errors (503 SlowDown) on reads, writes and commits, on the driver and in the
  replicas, are retried with backoff: the run completes with every id exactly once.
- Persistent errors end with a message naming the URI: an unreadable input before any
  model work, an unwritable output as a failed shard (the others are committed); a rerun
  after the store recovers finishes the job.
- The S3 secret and access key appear nowhere: not in the report, the output objects, the
  CLI/driver output or any Ray log file.

Ray starts before the credentials are put in the driver's environment, so replicas reach the
store only through the settings the pipeline ships to them, as on a real cluster.
"""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

import pyarrow.fs as pafs
import pytest
from pipeline_fixtures import (local_ray, patched_env, all_prompts, assert_exactly_once, moto_s3, read_output, s3_filesystem,
                               tiny_model, write_shards)

from pipeline import InputError, run_generate

pytestmark = pytest.mark.ray
SHARDS, ROWS = 4, 4
ACCESS_KEY, SECRET = "AKIAFAULTSUITE7Q3Z", "fault-suite-secret-Zq81-never-log-me"


@pytest.fixture(scope="module")
def s3():
    with local_ray(), moto_s3(access_key=ACCESS_KEY, secret_key=SECRET) as server, \
            patched_env(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
                        PERSIMMON_S3_ENDPOINT=server["endpoint"]):
        fs = s3_filesystem(server)
        write_shards(f"{server['bucket']}/in", shards=SHARDS, rows=ROWS, fs=fs)
        yield {**server, "fs": fs}


def _kwargs(s3, out: str, **extra) -> dict:
    return dict(input=f"s3://{s3['bucket']}/in/", output=f"s3://{s3['bucket']}/{out}", model=tiny_model("causal"),
                replicas=2, max_new_tokens=3, batch_size=4, **extra)


def _ids(s3, out: str) -> list:
    return read_output(f"{s3['bucket']}/{out}", fs=s3["fs"])["id"].to_pylist()


def test_transient_errors_are_retried_with_backoff(s3, capfd):
    faults, b = s3["faults"], s3["bucket"]
    faults.clear()
    # the S3 client tries 3 times on its own; 4 failures need one retry of ours on top
    faults.add("GET", rf"^{b}/in/part-00001\.parquet$", 4)                 # planning (driver)
    faults.add("PUT", rf"^{b}/out/_tmp/_part-00002\.parquet\.", 3)        # replica writing: redo
    faults.add("COPY", rf"^{b}/out/part-00003\.parquet$", 4)               # replica committing
    faults.add("PUT", rf"^{b}/out/_tmp/__run_report\.json\.", 3)          # driver writing the report
    report = run_generate(**_kwargs(s3, "out"))

    assert report["complete"], report
    assert [r["left"] for r in faults.rules] == [0, 0, 0, 0]  # every injected fault was hit
    assert_exactly_once(_ids(s3, "out"), all_prompts(SHARDS, ROWS)[0])
    assert report["this_run"]["storage_redos"] == 1 and report["units"]["failed"] == 0
    assert report["rows_retried"] == ROWS  # part-00002 ran twice
    [redo] = report["retried_units"]
    assert redo["output"] == "part-00002.parquet" and redo["why"][0].startswith("io_error: OSError: write s3://")
    copies = [t for t, *_ in faults.hits("COPY", r"out/part-00003\.parquet$")]
    assert len(copies) == 5  # 3 by the client, then our retry: 1 more failure, 1 success
    assert copies[3] - copies[2] >= 0.25  # our backoff (0.5 s x 0.5-1.5) before the retry
    saved = s3["fs"].open_input_stream(f"{b}/out/_run_report.json").read()
    assert json.loads(saved)["complete"]
    _assert_no_secrets(s3, capfd.readouterr())


def test_persistent_errors_name_the_uri_and_a_rerun_finishes(s3, capfd):
    faults, b = s3["faults"], s3["bucket"]
    faults.clear()
    # an input that cannot be read at all: named before any model work
    faults.add("HEAD", rf"^{b}/in/part-00002\.parquet$", None)
    faults.add("GET", rf"^{b}/in/part-00002\.parquet$", None)
    with pytest.raises(InputError) as e:
        run_generate(**_kwargs(s3, "out2", io_retries=1))
    assert f"s3://{b}/in/part-00002.parquet: unreadable Parquet" in str(e.value)
    assert "gave up after 2 attempts" in str(e.value)

    # an output that cannot be written: that shard fails, naming its URI; the others commit
    faults.clear()
    faults.add("PUT", rf"^{b}/out2/_tmp/_part-00001\.parquet\.", None)
    report = run_generate(**_kwargs(s3, "out2", io_retries=1))
    assert report["complete"] is False
    assert report["units"] == {"total": 4, "done": 3, "skipped": 0, "failed": 1, "bad": 0, "stale": 0}
    [failed] = report["failed_units"]
    assert failed["output"] == "part-00001.parquet"
    assert f"write s3://{b}/out2/part-00001.parquet (temp file _tmp/_part-00001.parquet." in failed["error"]
    assert failed["error"].endswith("(gave up after 2 attempts)")
    expected = all_prompts(SHARDS, ROWS)[0]
    assert_exactly_once(_ids(s3, "out2"), [i for i in expected if not ROWS <= i < 2 * ROWS])
    assert report["rows_written"] == report["rows_in"] - ROWS

    faults.clear()  # the store recovers: the rerun does only the failed shard
    report = run_generate(**_kwargs(s3, "out2"))
    assert report["complete"] and report["units"]["done"] == 1 and report["units"]["skipped"] == 3
    assert_exactly_once(_ids(s3, "out2"), expected)
    names = [i.path for i in s3["fs"].get_file_info(pafs.FileSelector(f"{b}/out2", recursive=True))]
    assert not [n for n in names if "/_tmp/" in n], names  # temp objects cleaned up
    _assert_no_secrets(s3, capfd.readouterr())


def test_a_read_failing_inside_a_replica_redoes_its_unit(s3, monkeypatch):
    """The fault is injected only once planning is over, so it can only hit a replica reading
    its unit: the unit is redone (a storage redo) and every row still lands once."""
    import pipeline.api as api

    faults, b = s3["faults"], s3["bucket"]
    faults.clear()
    planned = api.make_plan

    def plan_then_break_reads(config):
        plan = planned(config)
        faults.add("GET", rf"^{b}/in/part-00003\.parquet$", 4)  # the client's 3 tries + 1 of ours
        return plan

    monkeypatch.setattr(api, "make_plan", plan_then_break_reads)
    report = run_generate(**_kwargs(s3, "out3"))
    assert report["complete"] and [r["left"] for r in faults.rules] == [0]
    [redo] = report["retried_units"]
    assert redo["output"] == "part-00003.parquet" and redo["why"][0].startswith("io_error: OSError: read s3://")
    assert report["this_run"]["storage_redos"] == 1
    assert_exactly_once(_ids(s3, "out3"), all_prompts(SHARDS, ROWS)[0])


def test_credentials_are_not_in_ray_logs(s3):
    """A job runs here first; the log files scanned include its replicas' own (named by pid),
    so the scan looks where the credentials would have been used."""
    import ray

    report = run_generate(**_kwargs(s3, "out4"))
    assert report["complete"]
    pids = {str(r["pid"]) for r in report["engine"]["replicas"]}
    logs = glob.glob(os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "**", "*"),
                     recursive=True)
    files = [p for p in logs if os.path.isfile(p)]
    replica_logs = [p for p in files if any(p.endswith((f"-{pid}.out", f"-{pid}.err")) for pid in pids)]
    assert pids and len(replica_logs) >= len(pids), (pids, [os.path.basename(p) for p in files][:20])
    leaks = Counter()
    for path in files:
        data = open(path, "rb").read()
        for secret in (SECRET, ACCESS_KEY):
            if secret.encode() in data:
                leaks[(os.path.basename(path), secret[:6])] += 1
    assert not leaks, leaks


def _assert_no_secrets(s3, captured) -> None:
    """Neither credential in the driver's output nor in any object the runs wrote."""
    texts = [captured.out, captured.err]
    fs = s3["fs"]
    for info in fs.get_file_info(pafs.FileSelector(s3["bucket"], recursive=True)):
        if info.type == pafs.FileType.File:
            texts.append(fs.open_input_stream(info.path).read().decode("latin-1"))
    for secret in (SECRET, ACCESS_KEY):
        assert not [t for t in texts if secret in t]
