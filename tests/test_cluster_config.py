"""cluster.yaml against Ray's own cluster-launcher schema (offline, as `ray up` checks it)."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    with open(os.path.join(REPO, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def validate(raw: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    return cfg


def test_cluster_yaml_is_valid_for_ray():
    cfg = validate(load())
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
