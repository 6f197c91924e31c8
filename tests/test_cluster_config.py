"""cluster.yaml and cluster_l4.yaml against Ray's own cluster-launcher schema (offline, as `ray up`
checks it), and cluster_l4.yaml the same cluster as cluster.yaml but for its GPU workers."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CLUSTERS = ("cluster.yaml", "cluster_l4.yaml")


def load(name: str = "cluster.yaml"):
    with open(os.path.join(REPO, name)) as f:
        return yaml.safe_load(f)


def validate(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("name", CLUSTERS)
def test_cluster_yaml_is_valid_for_ray(name):
    cfg = validate(load(name))
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # no GPU on the head
    gpu = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert gpu and all(t["resources"]["GPU"] >= 1 and t["max_workers"] > t["min_workers"] for t in gpu)
    assert any("pip install" in c and "persimmon-batch" in c for c in cfg["setup_commands"])
    assert "/home/ray/persimmon-batch" in cfg["file_mounts"]
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=disabled") == 2  # the same auth mode on head and workers
    assert "--dashboard-host=127.0.0.1" in starts
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0-py311")


def test_schema_catches_a_typo():
    raw = load()
    raw["available_node_types"]["gpu_worker"]["max_worker"] = 3  # typo of max_workers
    with pytest.raises(Exception, match="max_worker"):
        validate(raw)


def test_the_l4_cluster_differs_only_in_its_workers():
    """cluster_l4.yaml is cluster.yaml with g6.xlarge workers: head, image, setup and start
    commands must not drift apart."""
    main, l4 = load("cluster.yaml"), load("cluster_l4.yaml")
    assert l4["cluster_name"] != main["cluster_name"]  # two clusters can be up side by side
    worker = l4["available_node_types"]["gpu_worker"]
    assert worker["node_config"]["InstanceType"] == "g6.xlarge" and worker["resources"] == {"CPU": 4, "GPU": 1}
    for cfg in (main, l4):
        del cfg["cluster_name"]
        cfg["available_node_types"]["gpu_worker"]["node_config"].pop("InstanceType")
        cfg["available_node_types"]["gpu_worker"].pop("resources")
    assert l4 == main
