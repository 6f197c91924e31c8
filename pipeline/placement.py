"""Can the replicas run where they will go? Checked on the driver before any replica starts.

On local Ray the driver knows what the replicas will find: a pool that can never start (--device
cuda without CUDA, more GPUs or CPUs than this machine has) is a config error naming the fix
(exit 2) before Ray starts. On a cluster nodes may still join: the pool waits for room (up to
--replica-start-timeout-s), the driver says for what; a replica that cannot start stops the run.
"""

from __future__ import annotations

import logging
import math
import os
import sys

from .errors import ConfigError
from .settings import PipelineConfig

log = logging.getLogger(__name__)


def local_ray(config: PipelineConfig) -> bool:
    """Does the run use a Ray on this machine only? Yes without ray_address and RAY_ADDRESS, unless
    this process already joined a Ray it did not start."""
    if config.ray_address or os.environ.get("RAY_ADDRESS"):
        return False
    if not _connected():
        return True  # `init_ray` starts one here
    try:
        import ray

        return bool(ray._private.worker._global_node.is_head())  # this process started the head
    except Exception:  # noqa: BLE001 - private API: a Ray we cannot place is a cluster, where we wait
        return False


def _connected() -> bool:
    """Is this process connected to Ray? Asked without importing Ray (`plan` never does)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def local_resources(config: PipelineConfig) -> dict[str, float]:
    """What `init_ray` starts a local Ray with: --num-cpus (default: max(8, 2 x cores), Ray Data's
    helpers need CPUs beside the replicas) and the GPUs torch sees (the replicas' torch)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(config.num_cpus or max(8, 2 * (os.cpu_count() or 1))), "GPU": float(gpus)}


def check_device(config: PipelineConfig) -> None:
    """--device cuda needs CUDA where the replicas run; on local Ray that is this machine."""
    if config.device != "cuda" or not local_ray(config):
        return
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(f"device: cuda, but torch {torch.__version__} ({build}) sees no CUDA device on this "
                          "machine, where local Ray runs the replicas; use --device auto or cpu, or --ray-address "
                          "of a cluster with GPU nodes")


def replica_bundle(config: PipelineConfig) -> dict[str, float]:
    """The resources Ray reserves for one replica."""
    bundle = {"CPU": float(config.num_cpus_per_replica), "GPU": float(config.num_gpus_per_replica)}
    return {k: v for k, v in bundle.items() if v}


def fits(nodes: list[dict], bundle: dict[str, float]) -> float:
    """How many replicas of `bundle` the nodes hold (a replica's resources come from one node)."""
    if not bundle:
        return math.inf
    return sum(min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()) for node in nodes)


def check_room(config: PipelineConfig, replicas: int) -> None:
    """Room for the pool's first `replicas` replicas? If not: on local Ray a ConfigError naming the
    fix; on a cluster, once joined, a warning saying what the pool waits for."""
    local = local_ray(config)
    if _connected():
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    elif local:
        nodes = [local_resources(config)]
    else:
        return  # a cluster not joined yet: checked once connected
    if not local and config.device == "cuda" and not any(n.get("GPU") for n in nodes):
        log.warning("--device cuda: the Ray cluster reports no GPU; the driver cannot see whether the nodes "
                    "that will run replicas have CUDA (a replica that cannot start stops the run)")
    bundle = replica_bundle(config)
    room = fits(nodes, bundle)
    if room >= replicas:
        return
    pool = f"{replicas} replica(s) of {_amounts(bundle)} each"
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in bundle}
    if not local:
        log.warning("waiting up to %s s (--replica-start-timeout-s) for room for %s: the Ray cluster holds %d "
                    "of them now (%s in all); an autoscaler or nodes that join can add the rest",
                    config.replica_start_timeout_s, pool, room, _amounts(total))
        return
    lo, hi = config.replica_range
    fewer = f"--replicas {room}" + (f",{max(room, hi)}" if lo != hi else " or fewer")
    gpus = config.num_gpus_per_replica
    if gpus and fits(nodes, {"GPU": gpus}) < replicas:
        fix = ("use --num-gpus-per-replica 0 for CPU replicas" if not total["GPU"]
               else f"use {fewer}, or a --num-gpus-per-replica below 1 (replicas share a GPU)")
        raise ConfigError(f"num_gpus_per_replica: {pool} need {replicas * gpus:g} GPU(s), but local Ray has "
                          f"{total['GPU']:g} (the GPUs torch sees on this machine) and no node can join it; "
                          f"{fix}, or --ray-address of a cluster with GPU nodes")
    cpus = replicas * config.num_cpus_per_replica
    fix = (f"use {fewer}, " if room else "use ") + f"--num-cpus {math.ceil(cpus):g} or a smaller --num-cpus-per-replica"
    raise ConfigError(f"replicas: {pool} need {cpus:g} CPUs, but local Ray has {total.get('CPU', 0.0):g} "
                      f"(--num-cpus) and no node can join it, so the pool would wait "
                      f"--replica-start-timeout-s={config.replica_start_timeout_s} s for nothing; {fix}")


def _amounts(resources: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in resources.items()) or "no resources"
