"""Tell the Ray cluster autoscaler how many replicas a MIN,MAX pool wants.

Ray Data grows an actor pool only within the resources the cluster has now: with every GPU taken
nothing waits for one, the autoscaler sees no demand and the pool stays at MIN (ray #59144).

`ReplicaDemand` asks through Ray Data's autoscaling coordinator (a direct `request_resources`
would be overwritten). The coordinator also *reserves* what it asked for, which a Dataset then
cannot use, so: ask for MAX bundles when the cluster cannot hold them; withdraw as soon as a
node joins (the pool, every replica busy, grows onto it: `pipeline.api._data_context`); ask
again once the pool has taken everything; stop when the cluster holds MAX replicas, when a
request went unanswered for `WAIT_S`, and when the pool ends. Without an autoscaler, nothing.
"""

from __future__ import annotations

import logging
import time

from .placement import fits, replica_bundle
from .progress import DriverThread
from .settings import PipelineConfig

log = logging.getLogger(__name__)


class ReplicaDemand(DriverThread):
    """While the block runs, have the autoscaler add nodes until the cluster holds `replicas`
    replicas (none if not above `min_replicas`: a fixed pool's actors wait for nodes)."""

    EXPIRE_S = 60.0  # a request not renewed (the driver died) lapses by itself after this
    POLL_S = 1.0
    WAIT_S = 600.0  # a request that brought no node in this long is given up

    def __init__(self, config: PipelineConfig, min_replicas: int, replicas: int, run_id: str):
        super().__init__("persimmon-batch-demand")
        self.bundle = replica_bundle(config)
        self.replicas = replicas if replicas > min_replicas and self.bundle else 0
        self.requester = f"persimmon-batch-{run_id}"
        self._coordinator = None
        self._asked_at: float | None = None

    def _wanted(self) -> bool:
        return bool(self.replicas) and _has_autoscaler()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._withdraw()

    def _loop(self):
        import ray

        held = -1  # replicas the cluster could hold when nodes were last asked for
        last_renewed = 0.0
        while not self._stop.is_set():
            try:
                # replicas the cluster's totals hold (not node by node), and its free resources
                total, free = (fits([r], self.bundle) for r in (ray.cluster_resources(), ray.available_resources()))
            except Exception as e:  # noqa: BLE001 - the GCS is busy: ask again next time
                log.debug("cluster resources unavailable: %s", e)
                total = free = None
            now = time.monotonic()
            if total is None:
                pass
            elif total >= self.replicas:
                self._withdraw()
                return  # room for every replica: the pool grows by itself from here
            elif self._asked_at is not None:
                if total > held:
                    self._withdraw()  # a node joined: hand it to the pool
                elif now - self._asked_at > self.WAIT_S:
                    log.warning("asked the autoscaler for room for %d replica(s) %.0f s ago and got no node; "
                                "going on with %d", self.replicas, self.WAIT_S, total)
                    self._withdraw()
                    return
                elif now - last_renewed > self.EXPIRE_S / 3:
                    self._ask()
                    last_renewed = now
            elif free == 0:  # the pool has taken every replica's room there is: ask for more
                held = total
                self._ask()
                self._asked_at = last_renewed = now
            self._stop.wait(self.POLL_S)

    def _ask(self) -> None:
        try:
            if self._coordinator is None:
                from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator

                self._coordinator = get_or_create_autoscaling_coordinator()
            self._coordinator.request_resources.remote(requester_id=self.requester, resources=[self.bundle] * self.replicas,
                                                       expire_after_s=self.EXPIRE_S)
        except Exception as e:  # noqa: BLE001 - private Ray Data API: the pool still runs at MIN
            log.warning("could not ask the autoscaler for %d replica(s) (%s: %s); the pool grows only onto nodes "
                        "that join by themselves", self.replicas, type(e).__name__, e)
            self._stop.set()

    def _withdraw(self) -> None:
        """Cancel the request; the coordinator looks at the cluster now, not in up to 20 s (until
        then a Dataset does not see the nodes that joined)."""
        if self._coordinator is not None and self._asked_at is not None:
            try:
                self._coordinator.cancel_request.remote(self.requester)
                self._coordinator.get_reserved_resources.remote(self.requester, recompute=True)
            except Exception as e:  # noqa: BLE001 - the request lapses after EXPIRE_S anyway
                log.warning("could not withdraw the autoscaler request (%s); it lapses in %.0f s", e, self.EXPIRE_S)
        self._asked_at = None


def _has_autoscaler() -> bool:
    """Does the cluster run Ray's autoscaler (its monitor publishes a status)?"""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        return _internal_kv_get(DEBUG_AUTOSCALING_STATUS) is not None
    except Exception:  # noqa: BLE001 - cannot tell: do not reserve anything
        return False
