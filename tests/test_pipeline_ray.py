"""End to end on one local Ray (started once for the module) with the tiny models:
generate / classify / label over 4+ shards on 2 replicas, exactly-once ids, results equal to
calling the engine directly, resume, the composable Dataset, the CLI and the demo."""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import all_prompts, read_output, tiny_model, write_shards
from tolerances import approx_forward

from model import Engine, SamplingParams
from pipeline import PipelineConfig, build_dataset, run_classify, run_generate, run_label
from pipeline.cli import main

pytestmark = pytest.mark.ray
SHARDS, ROWS = 4, 5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    write_shards(str(d / "in"), shards=SHARDS, rows=ROWS)
    return str(d / "in")


def assert_exactly_once(table: pa.Table, expected_ids):
    counts = Counter(table["id"].to_pylist())
    assert sorted(counts) == sorted(expected_ids)
    assert set(counts.values()) == {1}, [i for i, c in counts.items() if c > 1]


def test_generate_end_to_end_matches_engine(ray_local, inputs, tmp_path):
    # a fifth shard with bad rows: they come back with an error, their neighbours do not
    bad = pa.table({"id": pa.array([100, 101, 102, 103, 104], pa.int64()),
                    "prompt": ["fine prompt", None, "   ", "word " * 600, "also fine"],
                    "meta": list("abcde")})
    pq.write_table(bad, os.path.join(inputs, "..", "bad.parquet"))
    in_files = [os.path.join(inputs, f) for f in sorted(os.listdir(inputs))] + [os.path.join(inputs, "..", "bad.parquet")]
    out = str(tmp_path / "out")
    report = run_generate(input=in_files, output=out, model=tiny_model("causal"), replicas=2,
                          max_new_tokens=6, batch_size=4, keep_columns=["meta"])
    assert report["complete"], report
    ids, prompts = all_prompts(SHARDS, ROWS)
    table = read_output(out).sort_by("id")
    assert_exactly_once(table, ids + bad["id"].to_pylist())
    assert report["rows_in"] == report["rows_written"] == len(ids) + 5
    assert report["this_run"]["replicas"] == 2 and report["units"]["done"] == SHARDS + 1
    run = report["this_run"]  # startup: a replica process is up, loads its model, starts the first unit
    assert 0 < run["replica_start_s"] < run["startup_s"] and run["model_load_s"] > 0
    assert report["errors_by_kind"] == {"invalid_prompt": 1, "empty_prompt": 1, "prompt_too_long": 1}
    assert len(os.listdir(out)) == SHARDS + 2  # outputs + _run_report.json (no _tmp left)

    engine = Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, dtype="float32", device="cpu")
    direct = engine.generate(prompts + ["fine prompt", "also fine"], SamplingParams(max_new_tokens=6))
    # the report's token count against an independent count: the bare engine's on the same rows
    assert report["tokens_generated"] == sum(c.num_generated_tokens for c in direct)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert [rows[i]["completion"] for i in ids + [100, 104]] == [c.text for c in direct]
    assert [rows[i]["meta"] for i in ids] == [f"m{i}" for i in ids]
    assert [rows[i]["error"] is None for i in (100, 101, 102, 103, 104)] == [True, False, False, False, True]
    saved = json.load(open(os.path.join(out, "_run_report.json")))
    assert saved["complete"] and saved["config"]["max_new_tokens"] == 6


def test_classify_end_to_end_matches_engine(ray_local, inputs, tmp_path):
    out = str(tmp_path / "out")
    report = run_classify(input=inputs, output=out, model=tiny_model("sequence_classification"),
                          replicas=2, batch_size=4)
    assert report["complete"] and report["this_run"]["replicas"] == 2
    ids, prompts = all_prompts(SHARDS, ROWS)
    table = read_output(out).sort_by("id")
    assert_exactly_once(table, ids)
    engine = Engine.from_pretrained(tiny_model("sequence_classification"), max_batch_size=4, device="cpu")
    direct = engine.classify(prompts)
    assert table["label"].to_pylist() == [c.label for c in direct]
    assert table["score"].to_pylist() == approx_forward([c.score for c in direct], engine.config, keys=64)


def test_label_end_to_end_matches_engine(ray_local, inputs, tmp_path):
    out = str(tmp_path / "out")
    choices = ["positive", "negative", "neutral"]
    report = run_label(input=inputs, output=out, model=tiny_model("causal"), replicas=2, batch_size=4,
                       choices=choices, prompt_template="Review: {prompt}\nSentiment:")
    assert report["complete"]
    ids, prompts = all_prompts(SHARDS, ROWS)
    table = read_output(out).sort_by("id")
    assert_exactly_once(table, ids)
    engine = Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, device="cpu")
    direct = engine.score_choices([f"Review: {p}\nSentiment:" for p in prompts], choices)
    assert table["label"].to_pylist() == [c.label for c in direct]
    assert table["scores"].to_pylist() == [approx_forward(c.scores, engine.config, keys=64) for c in direct]
    # the report's label histogram and close calls, counted independently from the output file
    labels = table["label"].to_pylist()
    assert report["labels"]["histogram"] == {c: labels.count(c) for c in choices}
    margins = table["margin"].to_pylist()
    assert report["labels"]["low_margin_rows"] == sum(m < 0.1 for m in margins)
    assert sum(report["labels"]["histogram"].values()) == len(ids)


def test_resume_recomputes_only_missing_shards_via_cli(ray_local, inputs, tmp_path):
    out = str(tmp_path / "out")
    args = ["generate", "--input", inputs, "--output", out, "--model", tiny_model("causal"),
            "--replicas", "1,2", "--max-new-tokens", "3", "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    files = sorted(f for f in os.listdir(out) if f.endswith(".parquet"))
    mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in files}
    os.remove(os.path.join(out, files[1]))  # as if the run died before committing this shard
    assert main(args) == 0
    report = json.load(open(os.path.join(out, "_run_report.json")))
    assert report["complete"] and report["units"]["done"] == 1 and report["units"]["skipped"] == SHARDS - 1
    assert report["this_run"]["rows_processed"] == ROWS and report["rows_written"] == SHARDS * ROWS
    for f in files:
        if f != files[1]:
            assert os.stat(os.path.join(out, f)).st_mtime_ns == mtimes[f]  # not recomputed
    assert_exactly_once(read_output(out), all_prompts(SHARDS, ROWS)[0])
    assert main(args) == 0  # nothing left to do: no actors started
    assert json.load(open(os.path.join(out, "_run_report.json")))["units"]["skipped"] == SHARDS


def test_build_dataset_composes(ray_local, inputs, tmp_path):
    config = PipelineConfig(task="generate", input=inputs, output=str(tmp_path / "unused"),
                            model=tiny_model("causal"), replicas=2, max_new_tokens=3, batch_size=4)
    ds = build_dataset(config).filter(lambda r: r["error"] is None)
    rows = ds.take_all()
    assert sorted(r["id"] for r in rows) == all_prompts(SHARDS, ROWS)[0]
    assert all(r["completion"] is not None and r["finish_reason"] in ("stop", "length") for r in rows)


def test_build_dataset_reads_every_input_format(ray_local, tmp_path):
    """JSONL and CSV inputs (read_parquet cannot read them) give one result row per input row,
    a line that is not JSON its error row, as `run` reads them."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.jsonl").write_text('{"id": "j1", "prompt": "hello"}\nnot json\n{"id": "j2", "prompt": "world"}\n')
    (src / "b.csv").write_text("id,prompt\nc1,first\nc2,second\n")
    config = PipelineConfig(task="generate", input=str(src), output=str(tmp_path / "unused"),
                            model=tiny_model("causal"), replicas=1, max_new_tokens=3, batch_size=2)
    rows = {r["id"]: r for r in build_dataset(config).take_all()}
    assert sorted(rows, key=str) == sorted(["j1", "j2", "c1", "c2", None], key=str)
    assert all(rows[i]["completion"] is not None and rows[i]["error"] is None for i in ("j1", "j2", "c1", "c2"))
    assert (rows[None]["error_kind"], rows[None]["error"]) == ("invalid_line", "line 2 is not JSON (Expecting "
                                                                               "value at column 1)")


def test_demo_command(ray_local, tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path), "--tasks", "generate,label", "--files", "4", "--rows", "3"]) == 0
    out = capsys.readouterr().out
    assert "persimmon-batch generate: complete" in out and "persimmon-batch label: complete" in out
    assert "all rows accounted for" in out
