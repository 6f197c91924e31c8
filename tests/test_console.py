"""What a user sees (pipeline/console.py) and what Ray's metrics show (pipeline/metrics.py).

The progress line is checked against hand-computed literals with a fake clock; a real run
checks that Ray Data's INFO lines are hidden unless --verbose while ours are printed; and the
replicas' metrics are scraped from the node's Prometheus endpoint (loopback) and compared with
the rows and tokens the run's own output holds."""

from __future__ import annotations

import io
import os
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import free_port, tiny_model, write_shards

from pipeline import run_generate
from pipeline.console import Console, progress_text


def test_progress_text_literals():
    assert progress_text(500, 2000, 1500, 3, 2, 10.0) == \
        "rows 500/2,000 (25%) | 50.0 rows/s | 150 tok/s | ETA 30s | 2 replicas busy | 3 errors"
    assert progress_text(12000, 12000, 0, 1, 1, 240.0) == \
        "rows 12,000/12,000 (100%) | 50.0 rows/s | 0 tok/s | ETA 0s | 1 replica busy | 1 error"
    assert progress_text(0, 90, 0, 0, 0, 5.0).startswith("rows 0/90 (0%) | 0.0 rows/s | 0 tok/s | ETA - |")
    assert "ETA 1h01m" in progress_text(1, 3662, 0, 0, 1, 1.0)  # 3661 rows left at 1 row/s


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_console_counts_committed_and_in_flight_rows_and_redraws_on_a_terminal():
    now = [100.0]
    out = Tty()
    c = Console(stream=out, clock=lambda: now[0])
    assert c.interval == 1.0 and Console(stream=io.StringIO()).interval == 30.0
    c.start(total_rows=40)
    now[0] = 110.0
    c.unit_done({"status": "done", "output": "s3://b/out/a.parquet", "rows_out": 10, "tokens_generated": 50,
                 "rows_error": 1})
    c.unit_done({"status": "failed", "output": "s3://b/out/x.parquet", "error": "boom"})  # no rows
    c._live = [{"unit": "b.parquet", "actor_id": "A1", "rows_done": 4, "tokens": 20, "errors": 0},
               {"unit": "c.parquet", "actor_id": "A2", "rows_done": 6, "tokens": 30, "errors": 2}]
    c.draw()
    assert out.getvalue() == "\r\x1b[K[persimmon-batch] rows 20/40 (50%) | 2.0 rows/s | 10 tok/s | ETA 10s | " \
                             "2 replicas busy | 3 errors"
    c.say("[2/4] done    b.parquet: ...")  # printed above the live line, which is drawn again
    assert out.getvalue().endswith("\r\x1b[K[persimmon-batch] [2/4] done    b.parquet: ...\n"
                                   "[persimmon-batch] rows 20/40 (50%) | 2.0 rows/s | 10 tok/s | ETA 10s | "
                                   "2 replicas busy | 3 errors")
    c.unit_done({"status": "done", "output": "/out/b.parquet", "rows_out": 10, "tokens_generated": 40, "rows_error": 0})
    assert [a["unit"] for a in c._live] == ["c.parquet"]  # its heartbeat counts are now committed counts
    assert c.text().startswith("rows 26/40 (65%)")
    quiet = io.StringIO()
    Console(enabled=False, stream=quiet).say("x")
    assert quiet.getvalue() == ""


RAY_INFO_MARKERS = ("streaming_executor.py", "logging_progress.py", "Running Dataset")


@pytest.mark.ray
def test_cli_prints_ours_and_hides_ray_info_unless_verbose(tmp_path):
    """Two real CLI runs in their own processes (stderr as a user sees it, not a terminal)."""
    import subprocess
    import sys

    write_shards(str(tmp_path / "in"), shards=2, rows=6)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": repo}

    def cli(out, *extra):
        cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--input", str(tmp_path / "in"), "--output",
               str(tmp_path / out), "--model", tiny_model("causal"), "--replicas", "1", "--max-new-tokens", "3",
               *extra]
        done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    err = cli("out")
    assert not [m for m in RAY_INFO_MARKERS if m in err], err
    assert "[persimmon-batch] [2/2] done" in err
    last = [line for line in err.splitlines() if line.startswith("[persimmon-batch] rows ")][-1]
    assert last.startswith("[persimmon-batch] rows 12/12 (100%)") and last.endswith("0 errors")
    verbose = cli("out_verbose", "--verbose")
    assert [m for m in RAY_INFO_MARKERS if m in verbose]  # the same run, verbose: Ray Data's lines are there


@pytest.mark.ray
def test_replicas_export_ray_metrics(tmp_path):
    import ray

    from pipeline.api import _loopback_only

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    with _loopback_only():
        ray.init(address="local", num_cpus=8, include_dashboard=False, _metrics_export_port=port,
                 _system_config={"metrics_report_interval_ms": 1000})
    try:
        write_shards(str(tmp_path / "in"), shards=2, rows=6)
        args = dict(input=str(tmp_path / "in"), model=tiny_model("causal"), replicas=1, max_new_tokens=3)
        assert run_generate(output=str(tmp_path / "out"), **args)["complete"]
        assert run_generate(output=str(tmp_path / "out2"), **args)["complete"]
        table = pa.concat_tables([pq.read_table(tmp_path / "out" / f) for f in os.listdir(tmp_path / "out")
                                  if f.endswith(".parquet")])
        want_rows, want_tokens = 2 * table.num_rows, 2 * sum(table["num_generated_tokens"].to_pylist())
        got = {}
        deadline = time.time() + 60
        while time.time() < deadline:  # the agent exports every second; both runs' counts must show
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            got = _scrape(body)
            if got.get("rows") == want_rows and got.get("tokens") == want_tokens:
                break
            time.sleep(1)
        assert got.get("rows") == want_rows and got.get("tokens") == want_tokens, (got, want_rows, want_tokens)
        assert got.get("batches", 0) >= 2  # one histogram observation per batch at least
    finally:
        ray.shutdown()


def _scrape(body: str) -> dict:
    """Totals of our metrics over all replicas, from Prometheus text."""
    names = {"ray_persimmon_batch_rows_total": "rows", "ray_persimmon_batch_generated_tokens_total": "tokens",
             "ray_persimmon_batch_batch_seconds_count": "batches"}
    out: dict = {}
    for line in body.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        if name in names and 'task="generate"' in rest:
            out[names[name]] = out.get(names[name], 0) + float(rest.rsplit(" ", 1)[-1])
    return out


def test_unit_line_from_typed_stats():
    # the per-unit line format is part of what users grep in logs
    from pipeline.report import UnitStats, unit_line

    st = UnitStats.from_dict({"status": "done", "rows_out": 5, "rows_error": 1, "tokens_generated": 9,
                              "seconds": 1.25, "input_fingerprint": {"size": 3}})
    assert unit_line(st) == "5 rows, 1 with error, 9 tokens, 1.2 s"
    assert st.extra == {"input_fingerprint": {"size": 3}} and st.committed
    assert unit_line(UnitStats.from_dict({"status": "failed", "error": "OSError: gone"})) == "OSError: gone"
    assert not UnitStats.from_dict({"status": "failed"}).committed
