"""The Ray autoscaler adds nodes for a MIN,MAX pool of GPU replicas and takes them back.

Ray's own harness for this is `ray.cluster_utils.AutoscalingCluster` with the fake multi-node
provider (each "cloud instance" is a raylet started on this machine). Its `start()` cannot be
used here: it runs `ray stop --force`, which kills every Ray on the machine (other test runs
included), and it reads the provider's `example.yaml`, which the Ray 2.60 wheel does not ship.
The fixture does what `start()` does otherwise: the provider's config (written out in full),
and `ray start --head --autoscaling-config ...` with RAY_FAKE_CLUSTER=1, as a child process of
this test, on 127.0.0.1 only.

The head has no GPU, workers come in one type (1 CPU, 1 fake GPU), 0 to 2 of them. With
`replicas="1,2"` and a GPU per replica, the run starts with no GPU at all: the first replica's
wait makes the autoscaler add a node; the pool must then reach 2 replicas on 2 nodes (ray
#59144: GPU pools that never grow past one replica under the autoscaler), and once the run is
over the idle nodes must be given back. The first replica is held mid-unit (SIGSTOP) until a
replica on a second node has taken a unit, so the growth is checked whatever the machine's
speed, not raced against it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from pipeline_fixtures import (all_prompts, assert_exactly_once, free_port, known_trackers, read_output, tiny_model,
                               tracker_attempts, write_shards)

from pipeline import run_generate
from pipeline.api import _loopback_only

pytestmark = [pytest.mark.ray, pytest.mark.slow]
IDLE_TIMEOUT_MIN = 0.5  # long enough for a pool to take a node that joined, short enough to watch it go
MAX_WORKERS = 2


def _provider_config(port: int) -> dict:
    """The fake multi-node provider's cluster config (Ray's example.yaml, with our nodes)."""
    return {
        "cluster_name": "persimmon-batch-test",
        "max_workers": MAX_WORKERS,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                    "max_workers": MAX_WORKERS},
        },
        "head_node_type": "ray.head.default",
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "upscaling_speed": 1.0,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _our_processes(marker: str) -> list[int]:
    """Pids of the processes whose command line names `marker` (this cluster's temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def autoscaling_cluster(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    root = tmp_path_factory.mktemp("autoscaler")
    temp_dir = f"/tmp/pb-as-{os.getpid()}-{root.name}"  # short: Ray's socket paths must fit
    port = free_port()
    config = root / "autoscaler.json"
    config.write_text(json.dumps(_provider_config(port)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # every node on 127.0.0.1 (read by the monitor too)
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    cmd = ["ray", "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
           f"--autoscaling-config={config}", "--include-dashboard=false",
           f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    with open(root / "head.log", "wb") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, (root / "head.log").read_text()[-3000:]
            try:
                with _loopback_only():
                    ray.init(address=f"127.0.0.1:{port}")
                break
            except Exception:  # noqa: BLE001 - the head is still starting
                assert time.monotonic() < deadline, (root / "head.log").read_text()[-3000:]
                time.sleep(1)
        yield root
    finally:
        ray.shutdown()
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        time.sleep(2)
        for pid in _our_processes(temp_dir):  # worker nodes the autoscaler had not taken back yet
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _gpu_nodes_alive() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0]


def test_autoscaler_adds_nodes_until_the_pool_is_at_max_and_takes_them_back(autoscaling_cluster, tmp_path):
    import threading

    shards, rows = 8, 40  # 20 batches a unit: the first replica is caught mid-unit however fast the machine
    assert _gpu_nodes_alive() == []  # min_workers 0: no GPU until a replica asks for one
    write_shards(str(tmp_path / "in"), shards=shards, rows=rows)
    out: dict = {}
    known = known_trackers()

    def run():
        try:
            out["report"] = run_generate(input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                                         model=tiny_model("causal"), replicas="1,2", num_gpus_per_replica=1,
                                         dtype="float32", max_new_tokens=8, batch_size=2, replica_start_timeout_s=300)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    held, grown = None, False
    deadline = time.monotonic() + 420
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            attempts = [a for a in tracker_attempts(known) if a["state"] == "running"]
            if held is None and attempts and 2 <= attempts[0]["rows_done"] <= rows - 10:
                held = attempts[0]
                os.kill(held["pid"], signal.SIGSTOP)  # the first replica stays busy: the pool wants a second
            elif held is not None and any(a["node_id"] != held["node_id"] for a in attempts):
                grown = True
                break
            time.sleep(0.1)
    finally:
        if held is not None:
            os.kill(held["pid"], signal.SIGCONT)
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), "the run did not finish"
    if "error" in out:
        raise out["error"]
    report = out["report"]
    assert held is not None and grown, "no replica on a second node took a unit while the first was busy"

    assert report["complete"], report
    assert_exactly_once(read_output(str(tmp_path / "out"))["id"].to_pylist(), all_prompts(shards, rows)[0])
    # the pool reached MAX: two replicas, each on a node the autoscaler launched for it
    per_node = report["this_run"]["units_per_node"]
    assert len(per_node) == MAX_WORKERS and sum(per_node.values()) == shards, per_node
    assert report["this_run"]["replicas"] == 2
    assert {r["node_id"] for r in report["replicas"]} == set(per_node)
    assert all(r["ended"] == "finished" for r in report["replicas"]), report["replicas"]

    # and the nodes go back once they are idle (idle_timeout_minutes), nothing left asking for them
    deadline = time.monotonic() + 60 * IDLE_TIMEOUT_MIN + 180
    while _gpu_nodes_alive():
        assert time.monotonic() < deadline, f"GPU nodes still up after the run: {_gpu_nodes_alive()}"
        time.sleep(1)
