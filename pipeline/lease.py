"""One run per output directory at a time: a lease file, `<output>/_lease.json`.

A run takes the lease before it plans (an --overwrite plan deletes outputs), renews it every
HEARTBEAT_S while it works, and deletes it when it ends. A second run on the same output finds
a live lease and stops with exit 2 naming the holder (host, pid, run id, since when). A lease
whose heartbeat is older than EXPIRY_S, or whose process on this same host is gone, belongs to a
run that died (SIGKILL, lost machine): the next run takes it over with a warning.

Taking it is atomic where the store allows: locally an O_EXCL create, then an atomic replace to
take over a stale one. Object stores have no create-if-absent through pyarrow: there the lease
is written, then read back after a pause, and the later writer wins the race; two runs started
within a second of each other on S3 can both pass, any later one is refused.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .config import ConfigError, mask_uri
from .storage import Location, exists, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)
LEASE_NAME = "_lease.json"
HEARTBEAT_S = 10.0
EXPIRY_S = 60.0


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its process no longer exists (killed, crashed)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


class Lease:
    def __init__(self, output: Location, run_id: str):
        self.loc = output.join(LEASE_NAME)
        self.run_id = run_id
        self.record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dir: str | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.record, "heartbeat_at": time.time(), "expires_after_s": EXPIRY_S}).encode()

    def _holder(self) -> dict | None:
        try:
            return json.loads(read_bytes(self.loc))
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self) -> "Lease":
        holder = self._holder() if exists(self.loc) else None
        if holder is not None and holder.get("run_id") != self.run_id:
            age = time.time() - float(holder.get("heartbeat_at", 0))
            if age < float(holder.get("expires_after_s", EXPIRY_S)) and not _dead_here(holder):
                raise ConfigError(
                    f"output {mask_uri(self.loc.parent.uri)} is in use by run {holder.get('run_id')} "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started_at', 0)))}, "
                    f"alive {age:.0f} s ago); wait for it to finish, or remove {LEASE_NAME} if you are sure it is gone")
            log.warning("taking over the lease of run %s on %s: %s", holder.get("run_id"),
                        mask_uri(self.loc.parent.uri), "its process on this host is gone" if _dead_here(holder)
                        else f"no heartbeat for {age:.0f} s (the run died)")
        if self.loc.is_local and holder is None:
            directory = os.path.dirname(self.loc.path)
            if not os.path.isdir(directory):  # made for the lease: removed again if the run leaves it empty
                os.makedirs(directory)
                self._made_dir = directory
            try:
                fd = os.open(self.loc.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:  # another run got there between our check and our create
                return self.acquire()
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
        else:
            write_bytes_atomic(self.loc, self._body())
            if not self.loc.is_local:
                time.sleep(1.0)  # let a concurrent writer land, then see who won
            current = self._holder()
            if current is None or current.get("run_id") != self.run_id:
                return self.acquire()  # someone else won: report them (or take over again)
        self._thread = threading.Thread(target=self._beat, name="persimmon-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                write_bytes_atomic(self.loc, self._body())
            except Exception as e:  # noqa: BLE001 - a missed heartbeat only shortens the lease
                log.warning("could not renew the lease %s: %s", mask_uri(self.loc.uri), e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self._holder()
            if holder is not None and holder.get("run_id") == self.run_id:
                self.loc.fs.delete_file(self.loc.path)
            if self._made_dir is not None and not os.listdir(self._made_dir):
                os.rmdir(self._made_dir)  # a run that failed before writing anything leaves nothing
        except Exception as e:  # noqa: BLE001 - an expired lease is taken over anyway
            log.warning("could not remove the lease %s: %s", mask_uri(self.loc.uri), e)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
