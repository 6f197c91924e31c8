"""Any fsspec store, proven on fsspec's memory:// filesystem without Ray: listing, planning,
committing each unit exactly once, resume, the output lease, and credentials in fsspec URLs.

memory:// lives in one process, so Ray replicas (other processes) cannot see it: these tests
drive `make_plan` and `UnitRunner` in this process with an echo engine, as the replicas would;
`run` refuses memory:// with a message saying so.
"""

from __future__ import annotations

import gzip
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import shard_tables, write_shards

from model import Completion
from pipeline import ConfigError, PipelineConfig, run
from pipeline.cli import main
from pipeline.lease import LEASE_NAME, Lease
from pipeline.plan import make_plan
from pipeline.unit_runner import UnitRunner
from pipeline.storage import resolve

MEM = fsspec.filesystem("memory")


class EchoEngine:
    """completion = the prompt reversed; records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def generate(self, prompts, params):
        self.calls.append(list(prompts))
        return [Completion(text=p[::-1], finish_reason="length", num_prompt_tokens=len(p), num_generated_tokens=3)
                for p in prompts]


@pytest.fixture
def root():
    """A fresh top-level directory on the process-wide memory filesystem, removed afterwards.
    URIs name it as fsspec users write them, memory://<root>/... (the filesystem's own path is
    /<root>/...)."""
    name = f"pb-{uuid.uuid4().hex[:8]}"
    yield name
    if MEM.exists(f"/{name}"):
        MEM.rm(f"/{name}", recursive=True)


def config(root: str, **kw) -> PipelineConfig:
    base = dict(task="generate", input=f"memory://{root}/in", output=f"memory://{root}/out", model="m",
                max_new_tokens=4, batch_size=4, keep_columns=["meta"])
    return PipelineConfig(**{**base, **kw}).validate()


def files(root: str, sub: str) -> list[str]:
    return sorted(p[len(f"/{root}/{sub}/"):] for p in MEM.find(f"/{root}/{sub}"))


def rows_out(root: str, name: str) -> list[dict]:
    with MEM.open(f"/{root}/out/{name}", "rb") as f:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in f.read().decode().splitlines()]
        return pq.read_table(f).to_pylist()


@pytest.mark.parametrize("output_format", ["parquet", "jsonl"])
def test_memory_store_commits_each_unit_once_and_resumes(root, output_format):
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MEM))
    write_shards(f"/{root}/in", shards=2, rows=5, fs=fs)
    extra = shard_tables(3, 5)[2]  # a third file, as gzipped JSONL in a partition directory
    with MEM.open(f"/{root}/in/day=2/c.jsonl.gz", "wb") as f:
        f.write(gzip.compress("".join(json.dumps(r) + "\n" for r in extra.to_pylist()).encode()))
    MEM.pipe(f"/{root}/in/_SUCCESS", b"")  # a marker: never an input
    cfg = config(root, output_format=output_format)
    ext = "." + output_format
    names = ["day=2__c" + ext, "part-00000" + ext, "part-00001" + ext]

    with Lease(resolve(cfg.output, cfg), "run-a"):
        with pytest.raises(ConfigError, match="in use by run run-a"):
            Lease(resolve(cfg.output, cfg), "run-b").acquire()
        plan = make_plan(cfg)
        assert sorted(u.output_name for u in plan.units) == names and not plan.done
        engine = EchoEngine()
        runner = UnitRunner(cfg, plan.schema, engine=engine)
        first = {u.output_name: runner.run_unit(u) for u in plan.units if u.output_name != names[0]}
        assert [s["status"] for s in first.values()] == ["done", "done"], first
        assert files(root, "out") == sorted([LEASE_NAME, *names[1:]] + (
            [f"_stats/{n}.json" for n in names[1:]] if output_format == "jsonl" else []))  # no _tmp left
        calls = len(engine.calls)
        again = next(u for u in plan.units if u.output_name == names[1])
        assert runner.run_unit(again)["status"] == "skipped" and len(engine.calls) == calls

        resumed = make_plan(cfg)  # a rerun: two committed, one to do
        assert sorted(resumed.done) == names[1:] and [u.output_name for u in resumed.todo] == names[:1]
        assert resumed.done[names[1]]["rows_out"] == 5
        assert runner.run_unit(resumed.todo[0])["status"] == "done"
        assert not make_plan(cfg).todo
    assert LEASE_NAME not in files(root, "out")  # released

    got = [r for n in names for r in rows_out(root, n)]
    want = pa.concat_tables(shard_tables(3, 5)).to_pylist()
    assert sorted(r["id"] for r in got) == [r["id"] for r in want]  # every row exactly once
    by_id = {r["id"]: r for r in got}
    assert all(by_id[r["id"]]["completion"] == r["prompt"][::-1] and by_id[r["id"]]["meta"] == r["meta"]
               for r in want)


def test_memory_store_globs_and_missing_inputs(root):
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MEM))
    write_shards(f"/{root}/in", shards=3, rows=2, fs=fs)
    plan = make_plan(config(root, input=f"memory://{root}/in/part-0000[02].parquet"))
    assert [u.output_name for u in plan.units] == ["part-00000.parquet", "part-00002.parquet"]
    assert [u.input_uri for u in plan.units] == [f"memory://{root}/in/part-00000.parquet",
                                                 f"memory://{root}/in/part-00002.parquet"]
    with pytest.raises(FileNotFoundError, match="matches no input files"):
        make_plan(config(root, input=f"memory://{root}/nothing"))


def test_run_refuses_a_store_replicas_cannot_see(root, monkeypatch):
    import pipeline.api

    monkeypatch.setattr(pipeline.api, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match="input: memory://.* private to this process"):
        run(config(root))


@pytest.mark.parametrize("url", ["gs://user:s3cretKEY@bucket/in", "abfs://account:s3cretKEY@container/in",
                                 "memory://user:s3cretKEY@x/in"])
def test_credentials_in_fsspec_urls_are_refused_and_masked(url, capsys):
    for flag in ("--input", "--output", "--model"):
        argv = ["generate", "--input", "in", "--output", "out", "--model", "m"]
        argv[argv.index(flag) + 1] = url
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "carries credentials" in err and url.split("://")[0] + "://***@" in err
        assert "s3cretKEY" not in err and "user:" not in err and "account:" not in err
    assert "s3cretKEY" not in repr(PipelineConfig(input=url, output="out", model="m"))


def _run_units(cfg) -> dict:
    plan = make_plan(cfg)
    runner = UnitRunner(cfg, plan.schema, engine=EchoEngine())
    return {u.output_name: runner.run_unit(u)["status"] for u in plan.todo}


def test_glob_characters_in_fsspec_names_are_literal(root):
    """fsspec's own copy and rm expand glob characters; commits and cleanups must not."""
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MEM))
    table = shard_tables(1, 3)[0]
    for name in ("p*.parquet", "ü?é[x].parquet"):
        with fs.open_output_stream(f"/{root}/in/{name}") as f:
            pq.write_table(table, f)
    cfg = config(root, output=f"memory://{root}/out?", keep_columns=[])
    assert _run_units(cfg) == {"p*.parquet": "done", "ü?é[x].parquet": "done"}
    for name in ("p*.parquet", "ü?é[x].parquet"):  # a file under its own name, not a directory
        assert MEM.isfile(f"/{root}/out?/{name}"), MEM.find(f"/{root}")
        with MEM.open(f"/{root}/out?/{name}", "rb") as f:
            assert pq.read_table(f).num_rows == 3
    assert len(make_plan(cfg).done) == 2  # and a rerun finds them committed


def test_a_glob_at_the_root_of_a_store_names_its_files(root):
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(MEM))
    name = f"{root}-top.parquet"
    with fs.open_output_stream(f"/{name}") as f:
        pq.write_table(shard_tables(1, 2)[0], f)
    try:
        from pipeline.plan import list_inputs

        (found,) = list_inputs(f"memory://{root}-top.parq*", config(root))
        assert found.loc.uri == f"memory://{name}" and found.name == name
    finally:
        MEM.rm_file(f"/{name}")
