"""One run per output directory at a time: a lease file, `<output>/_lease.json`.

A run takes the lease before it plans (an --overwrite plan deletes outputs), renews it every
HEARTBEAT_S and deletes it at the end. A second run finds a live lease and stops (exit 2) naming
the holder. A lease with no heartbeat for EXPIRY_S, or whose process on this host is gone, is a
dead run's: the next run takes it over with a warning.

Locally the lease is hard-linked into place from a temp file (create-if-absent), a stale one
first renamed away (only one run can). Object stores have no create-if-absent: written, read
back after a pause, the later writer wins (two runs started within a second on S3 can both
pass). A run whose lease another took over stops (`lost`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .errors import ConfigError
from .settings import mask_uri
from .storage import Location, read_bytes, write_bytes_atomic

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
        pass
    return False


class Lease:
    def __init__(self, output: Location, run_id: str):
        self.loc = output.join(LEASE_NAME)
        self.run_id = run_id
        self.record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dir: str | None = None
        self.lost: str | None = None  # why, once another run took the lease over

    def _body(self) -> bytes:
        return json.dumps({**self.record, "heartbeat_at": time.time(), "expires_after_s": EXPIRY_S}).encode()

    def _holder(self) -> dict | None:
        """The lease on file, None, or {"corrupt": reason} (a run killed while writing it)."""
        try:
            raw = read_bytes(self.loc)
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(raw)
            if not isinstance(holder, dict):
                raise ValueError(f"a JSON {type(holder).__name__}, not an object")
            float(holder.get("heartbeat_at", 0))
            float(holder.get("expires_after_s", EXPIRY_S))
            return holder
        except (ValueError, TypeError) as e:
            return {"corrupt": str(e) or "empty"}

    def _alive(self, holder: dict | None) -> bool:
        """`holder` is another run's lease, its heartbeat not expired and its process not gone."""
        if holder is None or "corrupt" in holder or holder.get("run_id") == self.run_id:
            return False
        age = time.time() - float(holder.get("heartbeat_at", 0))
        return age < float(holder.get("expires_after_s", EXPIRY_S)) and not _dead_here(holder)

    def live_holder(self) -> dict | None:
        """The lease of another live run (what `acquire` refuses), or None; read only."""
        holder = self._holder()
        return holder if self._alive(holder) else None

    def acquire(self) -> "Lease":
        directory = os.path.dirname(self.loc.path)
        if self.loc.is_local and os.path.exists(directory) and not os.path.isdir(directory):
            raise ConfigError(f"output {mask_uri(self.loc.parent.uri)} is a file, not a directory")
        for _ in range(20):
            holder = self._holder()
            if self._alive(holder):
                age = time.time() - float(holder.get("heartbeat_at", 0))
                raise ConfigError(
                    f"output {mask_uri(self.loc.parent.uri)} is in use by run {holder.get('run_id')} "
                    f"(host {holder.get('host')}, pid {holder.get('pid')}, started "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started_at', 0)))}, "
                    f"alive {age:.0f} s ago); wait for it to finish, or remove {LEASE_NAME} if you are sure "
                    "it is gone")
            if holder is not None:
                why = (f"its file is unreadable ({holder['corrupt']})" if "corrupt" in holder
                       else "its process on this host is gone" if _dead_here(holder)
                       else f"no heartbeat for {time.time() - float(holder.get('heartbeat_at', 0)):.0f} s (the run died)")
                log.warning("taking over the lease of run %s on %s: %s", holder.get("run_id"),
                            mask_uri(self.loc.parent.uri), why)
            if self._take(holder is not None):
                self._thread = threading.Thread(target=self._beat, name="persimmon-lease", daemon=True)
                self._thread.start()
                return self
        raise ConfigError(f"could not take the lease {mask_uri(self.loc.uri)}: other runs keep taking it")

    def _take(self, replacing: bool) -> bool:
        """Write our lease; True if it is ours then."""
        if self.loc.is_local:
            directory = os.path.dirname(self.loc.path)
            if not os.path.isdir(directory):  # made for the lease: removed again if the run leaves it empty
                os.makedirs(directory, exist_ok=True)
                self._made_dir = directory
            if replacing:  # only one run can move the old lease away; the others see ours next
                try:
                    os.rename(self.loc.path, f"{self.loc.path}.old-{self.run_id}")
                except FileNotFoundError:
                    return False
                os.unlink(f"{self.loc.path}.old-{self.run_id}")
            tmp = f"{self.loc.path}.new-{self.run_id}"
            with open(tmp, "wb") as f:
                f.write(self._body())
            try:
                os.link(tmp, self.loc.path)  # create-if-absent, with its whole content at once
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        write_bytes_atomic(self.loc, self._body())
        time.sleep(1.0)  # object stores: let a concurrent writer land, then see who won
        current = self._holder()
        return current is not None and current.get("run_id") == self.run_id

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                holder = self._holder()
                if holder is None or holder.get("run_id") != self.run_id:
                    self.lost = f"run {holder.get('run_id') if holder else '?'} took the lease over"
                    log.error("lost the lease on %s: %s; stopping", mask_uri(self.loc.parent.uri), self.lost)
                    return
                write_bytes_atomic(self.loc, self._body())
            except Exception as e:  # noqa: BLE001 - a missed heartbeat only shortens the lease
                log.warning("could not renew the lease %s: %s", mask_uri(self.loc.uri), e)

    def stop_renewing(self) -> None:
        """No more heartbeats (each writes a temp file under the output's _tmp/)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def release(self) -> None:
        self.stop_renewing()
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
