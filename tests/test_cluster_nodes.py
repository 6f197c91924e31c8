"""Nodes die and join mid-run, on a real multi-node Ray (`ray.cluster_utils.Cluster`: each node
its own raylet and object store, all on 127.0.0.1) with worker nodes advertising fake GPUs.

- a worker node removed while its replica holds an uncommitted unit (a lost spot instance):
  the run goes on with the other node, every id lands exactly once, the report counts the
  unit retried because its node died and the replica that ended with its node;
- a worker node added mid-run with replicas MIN,MAX: the pool grows onto it;
- a model on object storage (moto S3 on loopback) is fetched once per node and shared by the
  replicas of that node. Every node here shares one filesystem, unlike a real cluster, so
  each node gets its own HOME (the default cache is `~/.cache/...`): one disk per node, as on
  real machines.

When things happen is decided from the run's progress tracker (which replica holds which unit,
rows done), and the replica is frozen (SIGSTOP) before its node goes, so the unit is
uncommitted when the node dies by construction, not by timing luck.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
from pipeline_fixtures import (TrackerWatch, alarm, all_prompts, assert_exactly_once, known_trackers, loopback_cluster, moto_s3,
                               patched_env, read_output, s3_filesystem, tiny_model, tracker_attempts, upload_dir, write_shards)

from pipeline import run_generate
from pipeline.api import _loopback_only

pytestmark = [pytest.mark.ray, pytest.mark.slow]
GPU_REPLICAS = dict(num_gpus_per_replica=1, dtype="float32", max_new_tokens=8, batch_size=2,
                    replica_start_timeout_s=240)


@pytest.fixture(scope="module")
def cluster():
    """A head node (the driver's: no GPU, so no replica lands there); tests add workers."""
    with loopback_cluster() as (c, _):
        yield c


@pytest.fixture
def workers(cluster):
    """add(**node_args) -> a worker node on loopback; each is removed after the test."""
    added = []

    def add(**node_args):
        with _loopback_only():
            node = cluster.add_node(node_ip_address="127.0.0.1", **node_args)
        added.append(node)
        return node

    yield add
    for node in added:
        if node in cluster.worker_nodes:
            cluster.remove_node(node)


@pytest.fixture(autouse=True)
def deadline():
    with alarm(420, "the test did not finish in 420 s (replicas not placed?)"):
        yield


class OnAttempt(TrackerWatch):
    """Watch the run's progress tracker from a thread; when `when(attempt)` holds for an
    attempt, call `then(attempt)`: a result other than None ends the watch (recorded in
    `fired`), None means "not this one" and the watch goes on. Errors are recorded too."""

    interval_s, join_s = 0.05, 240.0

    def __init__(self, when, then):
        super().__init__()
        self.when, self.then = when, then
        self.fired: list = []
        self.error: list = []
        self._passed: set = set()

    def on_snapshot(self, attempts: list[dict]) -> bool:
        for a in attempts:
            if a["attempt"] in self._passed or not self.when(a):
                continue
            self._passed.add(a["attempt"])
            try:
                result = self.then(a)
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.error.append(e)
                return True
            if result is not None:
                self.fired.append(result)
                return True
        return False


def _kill(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _attempts_on(tracker_attempts, node_id):
    return [a for a in tracker_attempts if a.get("node_id") == node_id]


# ---- a node lost mid-unit ------------------------------------------------------------------------
def test_node_lost_mid_unit_the_run_goes_on_and_completes(cluster, workers, tmp_path):
    shards, rows = 10, 40  # 20 batches a unit: the freeze comes mid-unit however fast the machine
    nodes = {n.node_id: n for n in (workers(num_cpus=2, num_gpus=1), workers(num_cpus=2, num_gpus=1))}
    write_shards(str(tmp_path / "in"), shards=shards, rows=rows)

    def spot_loss(a):
        """Freeze the replica; if its unit is still uncommitted (the freeze came before the
        commit: no output file, the attempt still open), take its node away, then its frozen
        process. Else let it go on and wait for another attempt."""
        os.kill(a["pid"], signal.SIGSTOP)
        now = {b["attempt"]: b for b in loss.snapshot()}.get(a["attempt"], {})
        if now.get("state") != "running" or (tmp_path / "out" / a["unit"]).exists():
            os.kill(a["pid"], signal.SIGCONT)
            return None
        cluster.remove_node(nodes[a["node_id"]], allow_graceful=False)
        _kill(a["pid"], signal.SIGKILL)
        return now

    when = lambda a: (a["state"] == "running" and a["node_id"] in nodes  # noqa: E731
                      and 2 <= a["rows_done"] <= rows - 10)  # started, and far from its commit
    with OnAttempt(when, spot_loss) as loss:
        report = run_generate(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model("causal"),
                              replicas=2, **GPU_REPLICAS)
    assert not loss.error, loss.error
    [hit] = loss.fired
    lost_node, lost_unit = hit["node_id"], hit["unit"]
    survivor = next(n for n in nodes if n != lost_node)

    assert report["complete"] and report["error"] is None, {k: report.get(k) for k in ("error", "units", "failed_units", "retried_units", "nodes_lost", "replicas")}
    assert_exactly_once(read_output(str(tmp_path / "out"))["id"].to_pylist(), all_prompts(shards, rows)[0])
    assert report["rows_written"] == report["rows_in"] == shards * rows
    # the unit the lost node held is counted as retried because of it
    assert report["nodes_lost"]["nodes"] == [lost_node], (report["nodes_lost"], report["replicas"], report["retried_units"])
    assert report["nodes_lost"]["units_retried"] == 1 and report["nodes_lost"]["rows_retried"] == rows
    retried = {r["output"]: r for r in report["retried_units"]}
    assert retried[lost_unit]["node_lost"] == 1 and retried[lost_unit]["attempts"] >= 2
    [why] = retried[lost_unit]["why"]
    cut_at = int(re.match(r"node lost: its node died after (\d+) rows", why).group(1))
    assert hit["rows_done"] <= cut_at <= rows, why  # frozen after the rows it had done, before its commit
    assert report["rows_retried"] >= rows
    # per replica: the one on the lost node ended with it, mid-unit; the survivor finished
    replicas = report["replicas"]
    gone = [r for r in replicas if r["pid"] == hit["pid"]]
    assert [(r["node_id"], r["ended"], r["units_interrupted"]) for r in gone] == [(lost_node, "node_lost", 1)]
    assert gone[0]["rows_interrupted"] >= hit["rows_done"]
    assert all(r["node_id"] in (lost_node, survivor) for r in replicas), replicas
    assert all(r["ended"] == "finished" for r in replicas if r["node_id"] == survivor), replicas
    # every unit committed exactly once, by some replica, with its rows and tokens
    assert sum(r["units"] for r in replicas) == shards and sum(r["rows"] for r in replicas) == shards * rows
    assert sum(r["tokens"] for r in replicas) == report["tokens_generated"]
    assert report["this_run"]["units_per_node"].get(survivor, 0) >= 1


# ---- a node added mid-run -------------------------------------------------------------------------
class InThread:
    """Run `fn(**kwargs)` in a thread (Ray nodes can only be added from the main thread, which
    the test keeps for that); `result()` waits and returns what it returned, or raises."""

    def __init__(self, fn, **kwargs):
        self.value, self.error = None, None

        def target():
            try:
                self.value = fn(**kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in result()
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def _wait_for(what, run: InThread, timeout_s: float = 300):
    """Poll `what()` until it returns something truthy; fail if the run ends first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        found = what()
        if found:
            return found
        if not run.thread.is_alive():
            run.result()
            raise AssertionError("the run ended before the awaited moment")
        time.sleep(0.05)
    raise AssertionError(f"not seen in {timeout_s} s")


def test_node_added_mid_run_the_pool_grows_onto_it(cluster, workers, tmp_path):
    shards, rows = 8, 40  # 20 batches a unit: the replica is caught mid-unit however fast the machine
    first = workers(num_cpus=2, num_gpus=1)
    write_shards(str(tmp_path / "in"), shards=shards, rows=rows)
    known = known_trackers()
    run = InThread(run_generate, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                   model=tiny_model("causal"), replicas="1,2", **GPU_REPLICAS)
    # the only replica mid-unit: hold it there, so that what is left waits for a second one
    busy = _wait_for(lambda: [a for a in tracker_attempts(known) if a["state"] == "running"
                              and a["node_id"] == first.node_id and 2 <= a["rows_done"] <= rows - 10], run)[0]
    os.kill(busy["pid"], signal.SIGSTOP)
    try:
        second = workers(num_cpus=2, num_gpus=1)  # a GPU node joins: the pool may grow onto it
        _wait_for(lambda: _attempts_on(tracker_attempts(known), second.node_id), run)
    finally:
        os.kill(busy["pid"], signal.SIGCONT)
    report = run.result()

    assert report["complete"], report
    assert_exactly_once(read_output(str(tmp_path / "out"))["id"].to_pylist(), all_prompts(shards, rows)[0])
    per_node = report["this_run"]["units_per_node"]
    assert set(per_node) == {first.node_id, second.node_id} and sum(per_node.values()) == shards, per_node
    done_by_node: dict = {}
    for r in report["replicas"]:
        done_by_node[r["node_id"]] = done_by_node.get(r["node_id"], 0) + r["units"]
        assert r["ended"] == "finished", r
    assert done_by_node == per_node
    assert report["this_run"]["replicas"] == 2 and report["nodes_lost"]["nodes"] == []


# ---- the model cache: once per node --------------------------------------------------------------
class RequestLog:
    """WSGI middleware: records (method, key, Range header) of every request it passes on."""

    def __init__(self, app):
        self.app, self.log, self.lock = app, [], threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            self.log.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").lstrip("/"),
                             environ.get("HTTP_RANGE")))
        return self.app(environ, start_response)


def _whole_reads(log, key: str, size: int) -> int:
    """GETs of `key` that read it from its first byte to its last: a download, not a peek."""
    n = 0
    for method, path, rng in log:
        if method != "GET" or path != key:
            continue
        if rng is None:
            n += 1
            continue
        start, _, end = rng.removeprefix("bytes=").partition("-")
        if int(start) == 0 and (end == "" or int(end) >= size - 1):
            n += 1
    return n


def _replica_actors_per_node(nodes) -> dict:
    """How many replica actors (Ray Data's workers around UnitRunner) were placed on each of
    `nodes`, from the GCS actor table (dead actors stay listed)."""
    import ray

    per_node: dict = {}
    for a in ray._private.state.actors().values():
        node = (a.get("Address") or {}).get("NodeID")
        if "UnitRunner" in a.get("ActorClassName", "") and node in nodes:
            per_node[node] = per_node.get(node, 0) + 1
    return per_node


def test_remote_model_is_fetched_once_per_node_and_shared_by_its_replicas(cluster, workers, tmp_path):
    shards, rows = 8, 2
    homes = {}
    for k in range(2):  # two GPUs per node: two replicas each
        home = tmp_path / f"home-{k}"
        home.mkdir()
        node = workers(num_cpus=2, num_gpus=2, env_vars={"HOME": str(home)})
        homes[node.node_id] = home
    with moto_s3() as s3, patched_env(AWS_ACCESS_KEY_ID=s3["AWS_ACCESS_KEY_ID"],
                                      AWS_SECRET_ACCESS_KEY=s3["AWS_SECRET_ACCESS_KEY"],
                                      PERSIMMON_S3_ENDPOINT=s3["endpoint"]):
        fs, b = s3_filesystem(s3), s3["bucket"]
        write_shards(f"{b}/in", shards=shards, rows=rows, fs=fs)
        upload_dir(tiny_model("causal"), fs, f"{b}/models/tiny")
        requests = RequestLog(s3["faults"].app)
        s3["faults"].app = requests  # behind the fault injector, in front of moto
        report = run_generate(input=f"s3://{b}/in/", output=f"s3://{b}/out", model=f"s3://{b}/models/tiny",
                              replicas=4, **GPU_REPLICAS)  # model_cache_dir: the default, under ~
        ids = read_output(f"{b}/out", fs=fs)["id"].to_pylist()
        weights = os.path.getsize(os.path.join(tiny_model("causal"), "model.safetensors"))
        downloads = _whole_reads(requests.log, f"{b}/models/tiny/model.safetensors", weights)

    assert report["complete"], report
    assert_exactly_once(ids, all_prompts(shards, rows)[0])
    assert {r["node_id"] for r in report["replicas"]} <= set(homes), report["replicas"]
    # four replicas loaded the model (the pool starts once all four are up, and a replica
    # loads its model in its constructor), at least two on each node (a replica restarted on a
    # loaded machine, or a second round's pool, loads it again: from the node's cache) ...
    per_node = _replica_actors_per_node(homes)
    assert len(per_node) == 2 and min(per_node.values()) >= 2, per_node
    # ... and the weights crossed the network once per node, into that node's own cache
    assert downloads == len(homes), requests.log
    for node_id, home in homes.items():
        cache = home / ".cache" / "persimmon-batch" / "models"
        copies = [d for d in os.listdir(cache) if not d.endswith(".lock")]
        assert len(copies) == 1 and (cache / copies[0] / ".complete").exists(), (node_id, copies)
        assert (cache / copies[0] / "model.safetensors").stat().st_size == weights
