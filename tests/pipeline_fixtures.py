"""Helpers for the pipeline / jobs / cluster tests: tiny models, sample shards, moto S3, ports.

Plain functions (no fixtures here, so nothing leaks into other test modules); each test module
wraps what it needs in its own module-scoped fixtures.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

PROMPTS = [
    "the cat reads a long letter before lunch.",
    "Write a haiku about a quiet river.",
    "Our team builds the new server every morning.",
    "Explain why the sky is blue.",
    "The old teacher answers a simple question with great care.",
    "I loved this film, the acting was wonderful.",
    "Terrible service, the food was cold.",
    "def add(a, b):\n    return a + b",
]
LABELS = {0: "negative", 1: "positive"}
_MODELS: dict[str, str] = {}
_MODEL_ROOT = tempfile.mkdtemp(prefix="pb-test-models-")
atexit.register(shutil.rmtree, _MODEL_ROOT, ignore_errors=True)


def tiny_model(task: str = "causal") -> str:
    """A tiny checkpoint directory, built once per test process (causal or classifier)."""
    if task not in _MODELS:
        from model.tiny import build_tiny_checkpoint

        kwargs = {"id2label": LABELS} if task == "sequence_classification" else {}
        _MODELS[task] = build_tiny_checkpoint(os.path.join(_MODEL_ROOT, task), task=task, seed=0, **kwargs)
    return _MODELS[task]


def shard_tables(shards: int = 4, rows: int = 5, start: int = 0) -> list[pa.Table]:
    tables = []
    for s in range(shards):
        ids = list(range(start + s * rows, start + (s + 1) * rows))
        tables.append(pa.table({"id": pa.array(ids, pa.int64()),
                                "prompt": [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in ids],
                                "meta": [f"m{i}" for i in ids]}))
    return tables


def write_shards(directory: str, shards: int = 4, rows: int = 5, fs=None, row_group_size=None) -> list[str]:
    """Write `shards` files part-0000k.parquet (id, prompt, meta); returns their paths."""
    if fs is None:
        os.makedirs(directory, exist_ok=True)
    paths = []
    for s, table in enumerate(shard_tables(shards, rows)):
        path = f"{directory.rstrip('/')}/part-{s:05d}.parquet"
        pq.write_table(table, path, filesystem=fs, row_group_size=row_group_size)
        paths.append(path)
    return paths


def all_prompts(shards: int = 4, rows: int = 5) -> tuple[list[int], list[str]]:
    table = pa.concat_tables(shard_tables(shards, rows))
    return table["id"].to_pylist(), table["prompt"].to_pylist()


def read_output(directory: str, fs=None) -> pa.Table:
    """All output Parquet files of a run (ignores _run_report.json and _tmp/)."""
    import pyarrow.dataset as ds

    return ds.dataset(directory, filesystem=fs, format="parquet").to_table()


@contextlib.contextmanager
def local_ray(num_cpus: int = 8):
    """A fresh local Ray for one test module (loopback only, auth off), shut down afterwards.
    Logical CPU headroom: Ray Data's helper actors need CPUs beside the replicas."""
    import ray

    from pipeline import PipelineConfig, init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    init_ray(PipelineConfig(input="-", output="-", model="-", num_cpus=num_cpus))
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def patched_env(**values: str):
    """Set environment variables for the duration of the block, then restore the old values."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_of(row: dict):
    """An output row's error as (error_kind, error) (a RowError), or None for a row with a result."""
    from pipeline.errors import RowError

    return None if row["error"] is None else RowError(row["error_kind"], row["error"])


def assert_exactly_once(ids_out, ids_in) -> None:
    """Every input id appears in the output as often as in the input (once, for unique ids)."""
    got, want = Counter(ids_out), Counter(ids_in)
    assert got == want, {"missing": dict(want - got), "extra": dict(got - want)}


class S3Faults:
    """WSGI middleware in front of moto: answer chosen requests with an S3 error, as a flaky
    or broken object store would. A rule is (METHOD, key regex, times): the first `times`
    matching requests fail (None = every one), or with `delay_s` are held that long and then
    answered normally (a slow store). METHOD is GET, PUT, HEAD, DELETE, POST or COPY (a PUT with
    x-amz-copy-source). Keys are `bucket/key`. Every request is logged as (time, method, key,
    status) when it arrives, so tests can check that retries happened and backed off."""

    BODY = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected fault'
            '</Message><Resource>/{key}</Resource><RequestId>fault</RequestId></Error>')

    def __init__(self, app):
        self.app = app
        self.rules: list[dict] = []
        self.log: list[tuple] = []
        self.lock = threading.Lock()

    def add(self, method: str, key_regex: str, times: int | None, status: int = 503, code: str = "SlowDown",
            delay_s: float | None = None):
        with self.lock:
            self.rules.append({"method": method, "key": re.compile(key_regex), "left": times,
                               "status": 200 if delay_s is not None else status, "code": code, "hits": 0,
                               "delay_s": delay_s})

    def clear(self):
        with self.lock:
            self.rules.clear()
            self.log.clear()

    def hits(self, method: str, key_regex: str) -> list[tuple]:
        with self.lock:
            return [e for e in self.log if e[1] == method and re.search(key_regex, e[2])]

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        if method == "PUT" and environ.get("HTTP_X_AMZ_COPY_SOURCE"):
            method = "COPY"
        key = environ.get("PATH_INFO", "").lstrip("/")
        fail = None
        with self.lock:
            for rule in self.rules:
                if rule["method"] == method and rule["key"].search(key) and rule["left"] != 0:
                    if rule["left"] is not None:
                        rule["left"] -= 1
                    rule["hits"] += 1
                    fail = rule
                    break
            self.log.append((time.monotonic(), method, key, fail["status"] if fail else 200))
        if fail is not None and fail["delay_s"] is not None:
            time.sleep(fail["delay_s"])
            fail = None
        if fail is None:
            return self.app(environ, start_response)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            environ["wsgi.input"].read(length)  # drain the upload
        body = b"" if method == "HEAD" else self.BODY.format(code=fail["code"], key=key).encode()
        start_response(f"{fail['status']} Injected", [("Content-Type", "application/xml"),
                                                      ("Content-Length", str(len(body)))])
        return [body]


@contextlib.contextmanager
def moto_s3(bucket: str = "bucket", access_key: str = "testing-key",
            secret_key: str = "testing-secret-do-not-log"):
    """A moto S3 server on 127.0.0.1:<free port> with one bucket; yields its settings, with
    `faults` (an `S3Faults` in front of it, no rules until a test adds some).

    moto keeps its data in process-wide state shared by every server in the process, so the
    state is reset when the server starts and stops: modules never see each other's objects."""
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    def reset():
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"),
                               timeout=10).read()

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    faults = S3Faults(server._server.app)
    server._server.app = faults  # the request handler calls server.app
    creds = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    try:
        reset()
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "bucket": bucket, "faults": faults, **creds}
    finally:
        faults.clear()
        try:
            reset()
        finally:
            server.stop()


def s3_filesystem(s3: dict):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=s3["endpoint"].split("://")[1], scheme="http",
                             access_key=s3["AWS_ACCESS_KEY_ID"], secret_key=s3["AWS_SECRET_ACCESS_KEY"],
                             region="us-east-1")


def upload_dir(local_dir: str, fs, dest: str) -> None:
    for name in os.listdir(local_dir):
        with open(os.path.join(local_dir, name), "rb") as src, fs.open_output_stream(f"{dest}/{name}") as out:
            out.write(src.read())


def read_all(path, cfg, forced: str | None = None):
    """Every row of an input file through its format (`forced`: --input-format), with the
    per-row errors keyed by row number."""
    from pipeline.formats import input_format
    from pipeline.storage import resolve

    loc = resolve(str(path), cfg)
    fmt = input_format(str(path), forced if forced is not None else cfg.input_format)
    found = fmt.inspect(loc, cfg)
    assert found.problem is None, found.problem
    rows, errors = [], {}
    columns = [cfg.id_column, cfg.prompt_column, *cfg.keep_columns]
    for split in found.splits:
        for table, errs in fmt.batches(loc, split, cfg, columns):
            errors.update({len(rows) + k: v for k, v in errs.items()})
            rows.extend(table.to_pylist())
    assert len(rows) == found.num_rows
    return rows, errors


@contextlib.contextmanager
def loopback_cluster(head_cpus: int = 1, workers: list[dict] | None = None):
    """A multi-node `ray.cluster_utils.Cluster` (each node its own raylet and object store, all
    on 127.0.0.1) with the driver connected; yields (cluster, worker nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.api import _loopback_only

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    with _loopback_only():  # every node and the driver on 127.0.0.1, nothing on other interfaces
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "node_ip_address": "127.0.0.1",
                                                          "include_dashboard": False})
        nodes = [c.add_node(node_ip_address="127.0.0.1", **w) for w in workers or []]
        ray.init(address=c.address)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


# ---- watching a run's progress tracker (fault tests) ---------------------------------------------
TRACKER_PREFIX = "persimmon-batch-progress-"  # pipeline.progress.start_tracker names the actor so


def known_trackers() -> set[str]:
    """Names of the progress trackers alive now (earlier runs'), to tell the next run's apart."""
    import ray

    return {n for n in ray.util.list_named_actors() if n.startswith(TRACKER_PREFIX)}


def tracker_attempts(known: set[str]) -> list[dict]:
    """The attempts of the run whose tracker is not in `known` (empty until it is up)."""
    import ray

    names = [n for n in ray.util.list_named_actors() if n.startswith(TRACKER_PREFIX) and n not in known]
    if not names:
        return []
    try:
        return ray.get(ray.get_actor(names[0]).snapshot.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - not up yet, or the run is over
        return []


class TrackerWatch:
    """A thread that polls the next run's progress tracker while the block runs: subclasses
    say what to do with each snapshot (`on_snapshot`, True to stop watching)."""

    interval_s = 0.02
    join_s = 10.0

    def __init__(self):
        self._known = known_trackers()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=self.join_s)

    def snapshot(self) -> list[dict]:
        return tracker_attempts(self._known)

    def on_snapshot(self, attempts: list[dict]) -> bool:
        raise NotImplementedError

    def _loop(self):
        while not self._done.is_set():
            if self.on_snapshot(self.snapshot()):
                return
            time.sleep(self.interval_s)


@contextlib.contextmanager
def alarm(seconds: int, message: str):
    """Fail with TimeoutError(message) if the block runs longer than `seconds` (a replica that
    cannot be placed waits silently; a test must fail instead of hanging)."""
    import signal

    def _raise(*_):
        raise TimeoutError(message)

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
