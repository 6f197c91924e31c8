"""Helpers for the pipeline / jobs / cluster tests: tiny models, sample shards, moto S3, ports.

Plain functions (no fixtures here, so nothing leaks into other test modules); each test module
wraps what it needs in its own module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str = "bucket"):
    """A moto S3 server on 127.0.0.1:<free port> with one bucket; yields its settings."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    creds = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log"}
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield {"endpoint": endpoint, "bucket": bucket, **creds}
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
