"""Multi-node: a `ray.cluster_utils.Cluster` with a CPU head and two worker nodes advertising one
(fake) GPU each. GPU replicas must land one per worker node and the output must be complete."""

from __future__ import annotations

from collections import Counter

import pytest
from pipeline_fixtures import alarm, all_prompts, loopback_cluster, read_output, tiny_model, write_shards

from pipeline import run_generate

pytestmark = pytest.mark.ray
SHARDS, ROWS = 4, 3


@pytest.fixture(scope="module")
def cluster():
    """A CPU head and two worker nodes advertising one (fake) GPU each."""
    with loopback_cluster(workers=[{"num_cpus": 2, "num_gpus": 1}] * 2) as (c, workers):
        yield c, {w.node_id for w in workers}


@pytest.fixture
def deadline():
    with alarm(240, "pipeline did not finish in 240 s (replicas not placed?)"):
        yield


def test_gpu_replicas_spread_over_nodes(cluster, deadline, tmp_path):
    _, worker_ids = cluster
    write_shards(str(tmp_path / "in"), shards=SHARDS, rows=ROWS)
    report = run_generate(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model("causal"),
                          replicas=2, num_gpus_per_replica=1, max_new_tokens=3, batch_size=4)
    assert report["complete"], report
    per_node = report["this_run"]["units_per_node"]
    assert set(per_node) == worker_ids, per_node  # one replica on each GPU node, none on the head
    assert sum(per_node.values()) == SHARDS and report["this_run"]["replicas"] == 2
    ids = read_output(str(tmp_path / "out"))["id"].to_pylist()
    assert Counter(ids) == Counter(all_prompts(SHARDS, ROWS)[0])


def test_unplaceable_replicas_fail_fast_instead_of_hanging(cluster, deadline, tmp_path):
    write_shards(str(tmp_path / "in"), shards=3, rows=2)  # 3 units, 3 one-GPU replicas, 2 GPUs
    report = run_generate(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=tiny_model("causal"),
                          replicas=3, num_gpus_per_replica=1, max_new_tokens=2, replica_start_timeout_s=8)
    assert not report["complete"] and report["units"]["failed"] == 3
    assert "Timed out while starting actors" in report["error"]
    assert report["rows_written"] == 0
