"""`persimmon-batch plan`: every check of a run, nothing written, no Ray, and numbers that
match what the run then does.

- The plan's rows, units, committed / stale / overwritten outputs and ids are those the run uses.
- Nothing is written and Ray is never imported; exit 2 where the task command would exit 2.
- Prompt-token statistics against the run itself: the tiny model's engine, called through the
  real UnitRunner in this process, reports each row's prompt tokens and refuses the rows the
  plan counts as too long (generate, label, classify; few-shot prefix and chat template on).
- A run whose units are all committed prints the plan's summary lines first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import read_output, tiny_model, write_shards

from model import Engine
from pipeline import PipelineConfig, dry_run
from pipeline.api import _checked
from pipeline.cli import main
from pipeline.plan import describe, make_plan, summary_lines
from pipeline.prompt_stats import percentiles
from pipeline.unit_runner import UnitRunner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(path) -> dict[str, int]:
    """Every file under `path` with its size and mtime: what a plan must leave as it is."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(path) for f in files}


def commit(config: PipelineConfig, engine, units=None) -> None:
    """Run and commit units in this process, as a replica would (all of the plan's todo)."""
    config = _checked(config)
    plan = make_plan(config)
    os.makedirs(config.output, exist_ok=True)
    runner = UnitRunner(config, plan.schema, engine=engine)
    for unit in plan.todo if units is None else [u for u in plan.todo if u.output_name in units]:
        assert runner.run_unit(unit)["status"] == "done"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(tiny_model("causal"), max_batch_size=8, device="cpu")


def test_plan_counts_what_the_run_would_do_and_writes_nothing(tmp_path, engine, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(str(src), shards=4, rows=5)
    pq.write_table(pa.table({"id": pa.array([3, None, 40], pa.int64()), "prompt": ["a", "b", "c"], "meta": ["x"] * 3}),
                   src / "part-00009.parquet")
    base = PipelineConfig(task="generate", input=str(src), output=str(out), model=tiny_model("causal"),
                          max_new_tokens=2)
    argv = ["plan", "generate", "--input", str(src), "--output", str(out), "--model", tiny_model("causal"),
            "--max-new-tokens", "2", "--json"]

    assert main(argv) == 0
    fresh = json.loads(capsys.readouterr().out)
    assert not out.exists()  # no output directory, no lease
    assert (fresh["input_files"], fresh["rows"], fresh["units"], fresh["already_committed"], fresh["to_run"]) == \
        (5, 23, 5, 0, 5)
    assert fresh["ids"]["duplicate_rows"] == 1 and fresh["ids"]["null_ids"] == 1
    assert fresh["ids"]["examples"][0]["again"] == f"{src}/part-00009.parquet row 0"

    commit(base, engine, units={"part-00000.parquet", "part-00001.parquet"})
    before = tree(tmp_path)
    assert main(argv) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert (resumed["already_committed"], resumed["to_run"], resumed["rows_to_run"]) == (2, 3, 13)
    assert main(argv + ["--overwrite"]) == 0  # would delete and redo both; deletes nothing
    overwrite = json.loads(capsys.readouterr().out)
    assert overwrite["overwrite"] == ["part-00000.parquet", "part-00001.parquet"] and overwrite["to_run"] == 5
    pq.write_table(pa.table({"id": pa.array(range(5), pa.int64()), "prompt": ["new"] * 5, "meta": ["m"] * 5}),
                   src / "part-00000.parquet")  # same ids, other prompts: its output is stale
    before[str(src / "part-00000.parquet")] = os.stat(src / "part-00000.parquet").st_mtime_ns
    assert main(argv) == 0
    stale = json.loads(capsys.readouterr().out)
    assert stale["stale"] == ["part-00000.parquet"] and stale["already_committed"] == 1
    assert tree(tmp_path) == before  # not a file added, changed or removed

    assert main(argv[:-1] + ["--no-resume"]) == 2  # what the task command refuses, the plan refuses
    assert "already holds 2 committed file(s); use --resume" in capsys.readouterr().err
    assert main(argv[:-1] + ["--keep-columns", "meta"]) == 2  # outputs written with other columns
    assert "was written with different settings" in capsys.readouterr().err
    assert tree(tmp_path) == before


def test_plan_exits_2_where_the_run_would_and_never_imports_ray(tmp_path):
    src = tmp_path / "in"
    write_shards(str(src), shards=2, rows=3)
    (src / "bad.parquet").write_bytes(b"not parquet")
    code = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
            "print('RAY IMPORTED' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")

    def plan(*args):
        return subprocess.run([sys.executable, "-c", code, "plan", "generate", "--output", str(tmp_path / "out"),
                               *args], capture_output=True, text=True, cwd=ROOT, timeout=300)

    bad_input = plan("--input", str(src), "--model", tiny_model("causal"))
    assert bad_input.returncode == 2 and "1 bad input file(s)" in bad_input.stderr and "bad.parquet" in bad_input.stderr
    bad_model = plan("--input", str(src / "part-00000.parquet"), "--model", str(tmp_path / "nothing"))
    assert bad_model.returncode == 2 and "does not exist" in bad_model.stderr
    classifier = plan("--input", str(src / "part-00000.parquet"), "--model", tiny_model("causal"), "--top-p", "2")
    assert classifier.returncode == 2 and "top_p" in classifier.stderr
    ok = plan("--input", str(src), "--model", tiny_model("causal"), "--on-bad-input", "skip")
    assert ok.returncode == 0, ok.stderr
    assert "6 rows: 0 already committed, 2 to run (6 rows); 1 bad file(s) skipped" in ok.stdout
    assert f"! {src}/bad.parquet: unreadable Parquet" in ok.stdout
    for result in (bad_input, bad_model, classifier, ok):
        assert result.stdout.strip().endswith("no ray")
    assert not (tmp_path / "out").exists()


def test_plan_reports_a_live_run_on_the_output_without_touching_its_lease(tmp_path, capsys):
    from pipeline.lease import Lease
    from pipeline.storage import resolve

    src = tmp_path / "in"
    write_shards(str(src), shards=1, rows=2)
    out = resolve(str(tmp_path / "out"), PipelineConfig(input="-", output="-", model="-"))
    with Lease(out, "other-run"):
        lease = (tmp_path / "out" / "_lease.json").read_bytes()
        assert main(["plan", "generate", "--input", str(src), "--output", str(tmp_path / "out"),
                     "--model", tiny_model("causal")]) == 0
        assert (tmp_path / "out" / "_lease.json").read_bytes() == lease
    assert "! output in use by run other-run" in capsys.readouterr().out


def _rows_of_every_length(path, n=40, long_every=4):
    """Prompts of 1 to ~n words, every `long_every`-th one long; one duplicate id, one null prompt."""
    prompts = [("word " * (3 * i + 1) if i % long_every == 0 else f"short prompt {i}") for i in range(n)]
    prompts[5] = None
    ids = list(range(n))
    ids[7] = 3
    os.makedirs(path, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "prompt": prompts}), f"{path}/a.parquet",
                   row_group_size=16)
    return n


@pytest.mark.parametrize("task", ["generate", "label"])
def test_prompt_statistics_are_what_the_engine_counts(tmp_path, task):
    """Exact statistics (--sample-rows 0) against a real run of the same rows: the engine's
    num_prompt_tokens (generate, with max_seq_len large enough for every row) and the rows it
    refuses as prompt_too_long (max_seq_len 48; generate: the median row's own token count, so
    rows sit on both sides of the boundary)."""
    n = _rows_of_every_length(str(tmp_path / "in"))
    settings = dict(task=task, input=str(tmp_path / "in"), model=tiny_model("causal"), chat_template=True,
                    rows_per_unit=16, batch_size=8)
    if task == "label":
        settings.update(choices=["yes", "a longer answer"], prompt_template="Q: {prompt}\nA:",
                        examples=[{"prompt": "is it?", "label": "yes"}])
    else:
        settings.update(examples=[{"prompt": "hi", "completion": "hello there"}], max_new_tokens=1)
    limit = 48
    if task == "generate":
        limit = dry_run(PipelineConfig(**settings, output=str(tmp_path / "x")), sample_rows=0)["prompt_tokens"]["tokens"]["p50"]
    short = PipelineConfig(**settings, output=str(tmp_path / "short"), max_seq_len=limit)
    stats = dry_run(short, sample_rows=0)["prompt_tokens"]
    assert stats["exact"] and stats["rows_read"] == n and stats["rows_not_run"] == 2  # the null prompt, the repeat

    commit(short, Engine.from_pretrained(tiny_model("causal"), max_seq_len=limit, max_batch_size=8, device="cpu"))
    kinds = Counter(read_output(str(tmp_path / "short"))["error_kind"].to_pylist())
    assert stats["rows_over_limit"] == kinds["prompt_too_long"] > 3
    assert stats["limit"] == {"name": "max_seq_len", "tokens": limit, "over": "prompt_too_long"}
    if task == "generate":
        long = dataclasses.replace(short, output=str(tmp_path / "long"), max_seq_len=None)
        commit(long, Engine.from_pretrained(tiny_model("causal"), max_batch_size=8, device="cpu"))
        counted = read_output(str(tmp_path / "long"))["num_prompt_tokens"].to_pylist()
        engine_counts = Counter(t for t in counted if t is not None)
        assert sum(engine_counts.values()) == n - 2
        assert stats["tokens"] == percentiles(engine_counts)
        assert dry_run(long, sample_rows=0)["prompt_tokens"]["rows_over_limit"] == 0


def test_classify_counts_rows_past_the_models_positions(tmp_path):
    src = tmp_path / "in"
    os.makedirs(src)
    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": ["fine", "word " * 600, "also fine"]}), src / "a.parquet")
    config = PipelineConfig(task="classify", input=str(src), output=str(tmp_path / "out"),
                            model=tiny_model("sequence_classification"), max_seq_len=16)
    stats = dry_run(config, sample_rows=0)["prompt_tokens"]
    assert stats["limit"]["name"] == "max_position_embeddings"  # classify ignores max_seq_len, as the engine does
    commit(config, Engine.from_pretrained(tiny_model("sequence_classification"), device="cpu"))
    kinds = Counter(read_output(str(tmp_path / "out"))["error_kind"].to_pylist())
    assert stats["rows_over_limit"] == kinds["prompt_too_long"] == 1


def test_a_sample_is_uniform_seeded_and_scaled_to_the_input(tmp_path):
    src = tmp_path / "in"
    os.makedirs(src)
    for k in range(5):  # a quarter of all rows are long, spread over every file
        pq.write_table(pa.table({"id": list(range(k * 400, (k + 1) * 400)),
                                 "prompt": ["word " * 80 if i % 4 == 0 else "short" for i in range(400)]}),
                       src / f"part-{k}.parquet")
    config = PipelineConfig(task="generate", input=str(src), output=str(tmp_path / "out"),
                            model=tiny_model("causal"), max_seq_len=64)
    first, again = (dry_run(config, sample_rows=200)["prompt_tokens"] for _ in range(2))
    assert first == {**again, "seconds": first["seconds"]}  # the same rows, the same numbers
    assert first["rows_read"] == 200 and not first["exact"]
    exact = dry_run(config, sample_rows=0)["prompt_tokens"]
    assert exact["rows_over_limit"] == 500
    assert first["rows_over_limit"] == round(first["rows_over_limit_read"] * 2000 / 200)
    assert 350 <= first["rows_over_limit"] <= 650  # 50 expected in the sample; 6 standard deviations wide


def test_jsonl_lines_that_cannot_be_read_are_not_measured(tmp_path):
    src = tmp_path / "in"
    os.makedirs(src)
    (src / "a.jsonl").write_text('{"id": 1, "prompt": "hello"}\nnot json\n{"id": 2, "prompt": "world"}\n')
    config = PipelineConfig(task="generate", input=str(src), output=str(tmp_path / "out"), model=tiny_model("causal"))
    stats = dry_run(config, sample_rows=0)["prompt_tokens"]
    assert (stats["rows_read"], stats["rows_not_run"]) == (3, 1)


def test_percentiles_are_nearest_rank():
    assert percentiles(Counter(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles(Counter({7: 3})) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles(Counter({1: 98, 500: 2})) == {"p50": 1, "p90": 1, "p99": 500, "max": 500}
    assert percentiles(Counter()) is None


def test_a_run_prints_the_plan_summary_first(tmp_path, engine, capsys):
    """Every unit committed already: the run plans, says so and ends without starting Ray."""
    import ray

    from pipeline import run

    src = tmp_path / "in"
    write_shards(str(src), shards=3, rows=4)
    config = PipelineConfig(task="generate", input=str(src), output=str(tmp_path / "out"), model=tiny_model("causal"),
                            max_new_tokens=2)
    commit(config, engine)
    planned = dry_run(config)
    capsys.readouterr()
    t0 = time.time()
    report = run(config)
    assert report["complete"] and not ray.is_initialized() and time.time() - t0 < 120
    said = [line.removeprefix("[persimmon-batch] ") for line in capsys.readouterr().err.splitlines()]
    expected = summary_lines({**planned, "prompt_tokens": None})  # prompt lengths: the plan command only
    assert said[:len(expected)] == expected
    assert expected[0] == "3 unit(s) from 3 input file(s), 12 rows: 3 already committed, 0 to run (0 rows)"
    assert describe(_checked(config), make_plan(_checked(config)))["already_committed"] == 3


def test_committed_outputs_are_checked_without_decoding_a_row(tmp_path, engine, monkeypatch):
    """Resume reads what each committed output's footer says (and the checksum of its bytes),
    never its rows: with every way of decoding Parquet rows refused, a plan still finds all
    three outputs committed."""
    from pipeline.plan import read_unit_stats
    from pipeline.storage import resolve

    src, out = tmp_path / "in", tmp_path / "out"
    write_shards(str(src), shards=3, rows=400)
    config = PipelineConfig(task="generate", input=str(src), output=str(out), model=tiny_model("causal"),
                            max_new_tokens=1, batch_size=64)
    commit(config, engine)

    def refuse(*args, **kwargs):
        raise AssertionError("a committed output's rows were decoded")

    with monkeypatch.context() as m:
        for name in ("read", "read_row_group", "read_row_groups", "iter_batches"):
            m.setattr(pq.ParquetFile, name, refuse)
        m.setattr(pq, "read_table", refuse)
        stats = [read_unit_stats(resolve(str(out / f"part-{k:05d}.parquet"), config)) for k in range(3)]
    assert [st["rows_out"] for st in stats] == [400, 400, 400]
    plan = dry_run(config)
    assert (plan["already_committed"], plan["to_run"], plan["stale"]) == (3, 0, [])


def test_the_task_may_follow_as_a_flag_or_come_from_the_config_file(tmp_path, capsys):
    src = tmp_path / "in"
    write_shards(str(src), shards=1, rows=3)
    (tmp_path / "label.yaml").write_text(f"task: label\ninput: {src}\noutput: {tmp_path / 'out'}\n"
                                         f"model: {tiny_model('causal')}\nchoices: [positive, negative]\n")
    common = ["--input", str(src), "--output", str(tmp_path / "out"), "--model", tiny_model("causal"), "--json"]
    assert main(["plan", "--task", "generate", *common]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "generate"
    assert main(["plan", *common, "--task=generate"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "generate"
    assert main(["plan", "--config", str(tmp_path / "label.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "label"
    assert main(["plan", "generate", "--config", str(tmp_path / "label.yaml")]) == 2  # as `generate --config` says
    assert "is for task 'label', not 'generate'" in capsys.readouterr().err
