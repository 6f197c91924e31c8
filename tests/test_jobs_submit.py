"""`ray job submit` of a jobs/ entrypoint to a local head started (and stopped) by this test.

The head runs `ray start --head --block` as our child process, bound to 127.0.0.1 only; the
job ships this repository as its working_dir, runs `python -m jobs.label --config <yaml>`,
and must reach SUCCEEDED with every id exactly once in the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter

import pytest
import yaml
from pipeline_fixtures import all_prompts, free_port, read_output, tiny_model, write_shards

pytestmark = pytest.mark.ray
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS, ROWS = 4, 3


def _port_outside_worker_range() -> int:
    while True:
        port = free_port()
        if not 10002 <= port <= 19999:
            return port


@pytest.fixture(scope="module")
def head():
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: unix socket paths are limited
    dash = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single node: bind to 127.0.0.1 only
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    log = open(os.path.join(temp_dir, "head.log"), "wb")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}",
         f"--ray-client-server-port={_port_outside_worker_range()}", "--num-cpus=4", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.flush()
                    raise RuntimeError("ray head did not start:\n" + open(log.name, errors="replace").read()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # our head only; never `ray stop`
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_label_job(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    write_shards(str(tmp_path / "in"), shards=SHARDS, rows=ROWS)
    config = {"task": "label", "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
              "model": tiny_model("causal"), "choices": ["positive", "negative"],
              "prompt_template": "Review: {prompt}\nSentiment:", "replicas": "2", "batch_size": 4}
    config_path = tmp_path / "label.yaml"
    config_path.write_text(yaml.safe_dump(config))

    client = JobSubmissionClient(head)
    job_id = client.submit_job(
        entrypoint=f"python -m jobs.label --config {config_path}",
        runtime_env={"working_dir": REPO, "excludes": [".git", ".venv", "tests", "*.parquet"]})
    deadline = time.time() + 240
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED):
        assert time.time() < deadline, client.get_job_logs(job_id)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "persimmon-batch label: complete" in logs

    ids = read_output(str(tmp_path / "out"))["id"].to_pylist()
    assert Counter(ids) == Counter(all_prompts(SHARDS, ROWS)[0])
    report = json.load(open(tmp_path / "out" / "_run_report.json"))
    assert report["complete"] and report["this_run"]["replicas"] == 2
