"""Fault injection, part 1: bad models, bad input files and bad rows.

- A bad model (missing dir, config.json that does not validate, weights that do not match it,
  a truncated weight file) fails on the driver with a clear message before Ray even starts.
- Bad input files (truncated, not Parquet, no prompt column, empty) are named before any
  model work, or skipped with on_bad_input=skip and listed in the run report.
- Bad rows (null / empty / whitespace / non-string / over-long prompts, odd unicode, invalid
  UTF-8, duplicate and null ids) each come back as one output row with `error` set while their
  neighbours get the same results as calling the engine directly.

Every test checks the row accounting exactly: ids in == ids out.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import assert_exactly_once, error_of, read_output, tiny_model, write_shards

from model import Engine, SamplingParams
from pipeline import InputError, ModelError, PipelineConfig, run_classify, run_generate
from pipeline.cli import main
from pipeline.stages import GenerateStage


@pytest.fixture
def no_ray():
    """The test must finish without starting Ray: failing fast means before any actor."""
    import ray

    assert not ray.is_initialized(), "a previous test module left Ray running"
    yield
    assert not ray.is_initialized(), "Ray was started for a run that should have failed before"


def _copy_model(tmp_path, name="m") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(tiny_model("causal"), dst)
    return dst


def _edit_config(model_dir: str, **changes) -> None:
    path = os.path.join(model_dir, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


# ---- bad models: fail on the driver, before Ray ---------------------------------------------
def test_bad_models_fail_fast_on_the_driver(tmp_path, no_ray):
    inputs = str(tmp_path / "in")
    write_shards(inputs, shards=2, rows=3)
    out = tmp_path / "out"

    missing = str(tmp_path / "no-such-model")
    invalid = _copy_model(tmp_path, "invalid")
    _edit_config(invalid, hidden_size=66)  # not divisible by 4 heads
    not_json = _copy_model(tmp_path, "not-json")
    open(os.path.join(not_json, "config.json"), "w").write("{ not json")
    wider = _copy_model(tmp_path, "wider")
    _edit_config(wider, hidden_size=128)  # weights are 64 wide
    deeper = _copy_model(tmp_path, "deeper")
    _edit_config(deeper, num_hidden_layers=3)  # weights have 2 layers
    truncated = _copy_model(tmp_path, "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    garbage = _copy_model(tmp_path, "garbage")
    open(os.path.join(garbage, "model.safetensors"), "wb").write(b"\x00" * 64)
    no_tokenizer = _copy_model(tmp_path, "no-tokenizer")
    os.remove(os.path.join(no_tokenizer, "tokenizer.model"))
    escaping = _copy_model(tmp_path, "escaping")
    json.dump({"weight_map": {"x": "../outside.safetensors"}},
              open(os.path.join(escaping, "model.safetensors.index.json"), "w"))

    cases = [
        (missing, f"model directory {missing} does not exist"),
        (invalid, "PersimmonConfig.hidden_size: 66 is not divisible by num_attention_heads=4"),
        (not_json, "config.json"),
        (wider, "weights do not match config.json (PersimmonForCausalLM): wrong shape"),
        (deeper, "missing 16: ['model.layers.2."),  # 16 tensors per layer
        (truncated, "(truncated?)"),
        (garbage, "not a safetensors file"),
        (no_tokenizer, "has no tokenizer.model"),
        (escaping, "names files outside the checkpoint dir: ['../outside.safetensors']"),
    ]
    for model_dir, message in cases:
        t0 = time.perf_counter()
        with pytest.raises(ModelError) as e:
            run_generate(input=inputs, output=str(out), model=model_dir, max_new_tokens=2)
        assert message in str(e.value), (model_dir, str(e.value))
        # before any replica starts (those take tens of seconds here); generous for a loaded machine
        assert time.perf_counter() - t0 < 20, "model checks must fail on the driver, before Ray starts"
    wider_error = None
    try:
        run_generate(input=inputs, output=str(out), model=wider)
    except ModelError as e:
        wider_error = str(e)
    vocab = json.load(open(os.path.join(wider, "config.json")))["vocab_size"]
    assert f"wrong shape 34: ['model.embed_tokens.weight: checkpoint ({vocab}, 64) vs config ({vocab}, 128)'" \
        in wider_error
    # a causal checkpoint for classify: the head does not fit the task
    with pytest.raises(ModelError, match="classify needs a PersimmonForSequenceClassification"):
        run_classify(input=inputs, output=str(out), model=tiny_model("causal"))
    assert not out.exists()  # nothing was written


def test_bad_model_cli_exit_code_and_message(tmp_path, capsys, no_ray):
    inputs = str(tmp_path / "in")
    write_shards(inputs, shards=1, rows=2)
    wider = _copy_model(tmp_path)
    _edit_config(wider, hidden_size=128)
    code = main(["generate", "--input", inputs, "--output", str(tmp_path / "out"), "--model", wider, "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "persimmon-batch: error: model" in err and "wrong shape" in err


# ---- bad input files -------------------------------------------------------------------------
def _bad_files(directory: str) -> dict[str, str]:
    """Good shards part-0000{0,1} (4 rows each) plus four bad ones; returns name -> reason."""
    write_shards(directory, shards=2, rows=4)
    good = pq.read_table(os.path.join(directory, "part-00000.parquet"))
    pq.write_table(good, os.path.join(directory, "whole.parquet"))
    data = open(os.path.join(directory, "whole.parquet"), "rb").read()
    os.remove(os.path.join(directory, "whole.parquet"))
    open(os.path.join(directory, "bad-truncated.parquet"), "wb").write(data[: len(data) // 2])
    open(os.path.join(directory, "bad-not-parquet.parquet"), "w").write("id,prompt\n1,hello\n")
    pq.write_table(pa.table({"id": pa.array([90, 91], pa.int64()), "text": ["a", "b"]}),
                   os.path.join(directory, "bad-no-prompt.parquet"))
    pq.write_table(good.schema.empty_table(), os.path.join(directory, "bad-empty.parquet"))
    return {"bad-truncated.parquet": "unreadable Parquet", "bad-not-parquet.parquet": "unreadable Parquet",
            "bad-no-prompt.parquet": "missing column(s) ['prompt']", "bad-empty.parquet": "empty (0 rows)"}


def test_bad_input_files_are_named_before_any_model_work(tmp_path, capsys, no_ray):
    inputs = str(tmp_path / "in")
    bad = _bad_files(inputs)
    with pytest.raises(InputError) as e:
        run_generate(input=inputs, output=str(tmp_path / "out"), model=tiny_model("causal"))
    message = str(e.value)
    assert message.startswith("4 bad input file(s) (use --on-bad-input=skip")
    for name, reason in bad.items():
        line = next(line for line in message.splitlines() if name in line)
        assert os.path.join(inputs, name) in line and reason in line, line
    assert "part-0000" not in message
    code = main(["generate", "--input", inputs, "--output", str(tmp_path / "out"), "--model",
                 tiny_model("causal"), "--quiet"])
    assert code == 2 and "bad-truncated.parquet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- runs on local Ray -----------------------------------------------------------------------
@pytest.mark.ray
def test_skipped_bad_files_are_listed_and_the_rest_is_exact(ray_local, tmp_path):
    inputs = str(tmp_path / "in")
    bad = _bad_files(inputs)
    out = str(tmp_path / "out")
    report = run_generate(input=inputs, output=out, model=tiny_model("causal"), replicas=2,
                          max_new_tokens=3, batch_size=4, on_bad_input="skip")
    assert_exactly_once(read_output(out)["id"].to_pylist(), list(range(8)))
    assert sorted(os.path.basename(b["input"]) for b in report["bad_inputs"]) == sorted(bad)
    for b in report["bad_inputs"]:
        assert bad[os.path.basename(b["input"])] in b["error"]
    rows = {os.path.basename(b["input"]): b["rows"] for b in report["bad_inputs"]}
    assert rows["bad-no-prompt.parquet"] == 2 and rows["bad-empty.parquet"] == 0
    assert rows["bad-truncated.parquet"] is None  # unknown: the footer is gone
    assert report["units"] == {"total": 6, "done": 2, "skipped": 0, "failed": 0, "bad": 4, "stale": 0}
    # rows of skipped files are not in the output: the run is not complete
    assert report["rows_in"] == 10 and report["rows_written"] == 8 and report["complete"] is False


def _odd_rows() -> tuple[pa.Table, pa.Table, dict]:
    """Two shards of awkward rows; returns them and {row key: expected error kind or None}."""
    long = "word " * 600  # beyond the tiny model's 512 positions
    a = [  # (id, prompt, expected kind); prompt bytes = raw (possibly invalid) UTF-8
        (0, "the cat reads a long letter", None),
        (1, None, "invalid_prompt"),
        (2, "", "empty_prompt"),
        (3, " \t\n\u3000 ", "empty_prompt"),
        (4, long, "prompt_too_long"),
        (5, "nul \x00 inside", None),
        (6, "emoji 😀🎉 family 👩‍👩‍👧", None),
        (7, "RTL \u202eolleh\u202c עברית مرحبا", None),
        (8, b"bad \xff\xfe utf-8", "invalid_prompt"),
        (9, b"lone surrogate \xed\xa0\x80 (WTF-8)", "invalid_prompt"),
        (3, "the same id again, in the same shard", "duplicate_id"),
        (10, "combining e\u0301\u0301 and BOM \ufeff and \U0010ffff", None),
        (11, "a fine neighbour at the end", None),
    ]
    b = [
        (0, "an id already used in the first shard", "duplicate_id"),
        (None, "a null id", "invalid_id"),
        (12, "a fine row in the second shard", None),
        (3, "the id again, in another shard", "duplicate_id"),
    ]

    def table(rows, shard):
        prompts = [p.encode() if isinstance(p, str) else p for _, p, _ in rows]
        return pa.table({"id": pa.array([i for i, _, _ in rows], pa.int64()),
                         "prompt": pa.array(prompts, pa.binary()).cast(pa.string(), safe=False),
                         "key": [f"{shard}{n}" for n in range(len(rows))]})

    expected = {f"a{n}": kind for n, (_, _, kind) in enumerate(a)}
    expected.update({f"b{n}": kind for n, (_, _, kind) in enumerate(b)})
    return table(a, "a"), table(b, "b"), expected


@pytest.mark.ray
def test_bad_rows_end_to_end(ray_local, tmp_path):
    """Every awkward row gets exactly one output row with the right error kind; good rows in
    between are computed as if alone; duplicate and null ids are counted in the report."""
    a, b, expected = _odd_rows()
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(a, inputs / "a.parquet")
    pq.write_table(b, inputs / "b.parquet")
    pq.write_table(pa.table({"id": pa.array([20, 21], pa.int64()), "prompt": [1, 2], "key": ["c0", "c1"]}),
                   inputs / "c-int-prompts.parquet")  # a non-string prompt column
    pq.write_table(a.schema.empty_table(), inputs / "d-empty.parquet")
    expected.update({"c0": "invalid_prompt", "c1": "invalid_prompt"})
    out = str(tmp_path / "out")
    report = run_generate(input=str(inputs), output=out, model=tiny_model("causal"), replicas=2,
                          max_new_tokens=4, batch_size=2, keep_columns=["key"], on_bad_input="skip")

    table = read_output(out)
    ids_in = a["id"].to_pylist() + b["id"].to_pylist() + [20, 21]
    assert_exactly_once(table["id"].to_pylist(), ids_in)  # duplicates and the null id kept
    assert_exactly_once(table["key"].to_pylist(), list(expected))  # one output row per input row
    rows = {r["key"]: r for r in table.to_pylist()}
    assert {k: r["error_kind"] for k, r in rows.items()} == expected
    assert error_of(rows["a10"]) == ("duplicate_id", "id 3 already appeared at a.parquet row 3")
    assert error_of(rows["b0"]) == ("duplicate_id", "id 0 already appeared at a.parquet row 0")
    assert error_of(rows["c0"]) == ("invalid_prompt", "expected a string, got int")
    assert "not valid UTF-8" in rows["a8"]["error"] and "not valid UTF-8" in rows["a9"]["error"]

    ok = [k for k, kind in expected.items() if kind is None]
    source = {f"a{n}": p for n, p in enumerate(a["prompt"].cast(pa.binary()).to_pylist())}
    source.update({f"b{n}": p for n, p in enumerate(b["prompt"].cast(pa.binary()).to_pylist())})
    direct = Engine.from_pretrained(tiny_model("causal"), max_batch_size=2, device="cpu").generate(
        [source[k].decode() for k in ok], SamplingParams(max_new_tokens=4))
    assert [rows[k]["completion"] for k in ok] == [c.text for c in direct]
    assert all(rows[k]["completion"] is None for k, kind in expected.items() if kind is not None)

    assert report["complete"] is True  # the empty file holds no rows: nothing is missing
    assert report["rows_in"] == report["rows_written"] == len(expected)
    assert report["units"]["bad"] == 1 and report["bad_inputs"][0]["input"].endswith("d-empty.parquet")
    kinds = {}
    for kind in expected.values():
        if kind:
            kinds[kind] = kinds.get(kind, 0) + 1
    assert report["errors_by_kind"] == kinds and report["rows_with_error"] == sum(kinds.values())
    ids = report["ids"]
    assert (ids["duplicate_rows"], ids["duplicate_ids"], ids["null_ids"]) == (3, 2, 1)
    assert {e["id"] for e in ids["examples"]} == {"0", "3"}
    assert report["rows_retried"] == 0 and report["units"]["failed"] == 0


def test_lone_surrogates_from_python_fail_only_their_row():
    """Python strings can hold lone surrogates (Arrow strings cannot): the stage must not pass
    them to the tokenizer, which would raise for the whole batch."""
    engine = Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, device="cpu")
    config = PipelineConfig(task="generate", input="-", output="-", model=tiny_model("causal"),
                            max_new_tokens=3, batch_size=4)
    prompts = ["fine before", "a\ud800b", "fine after", "\udfff"]
    rows = GenerateStage(config, engine=engine)({"id": [1, 2, 3, 4], "prompt": prompts}).to_pylist()
    assert [r["id"] for r in rows] == [1, 2, 3, 4]
    assert error_of(rows[1]) == ("invalid_prompt", "lone surrogate U+D800 at position 1")
    assert error_of(rows[3]) == ("invalid_prompt", "lone surrogate U+DFFF at position 0")
    direct = engine.generate(["fine before", "fine after"], SamplingParams(max_new_tokens=3))
    assert [rows[0]["completion"], rows[2]["completion"]] == [c.text for c in direct]


def test_duplicate_ids_land_on_the_right_rows_of_split_units(tmp_path):
    """Files split into several units (rows_per_unit) and record batches smaller than a unit:
    the flagged rows are exactly the later occurrences, wherever they fall. No Ray: the shard
    runner is called directly."""
    from pipeline.plan import make_plan
    from pipeline.unit_runner import UnitRunner

    inputs = tmp_path / "in"
    inputs.mkdir()
    first = list(range(10))
    second = [10, 11, 2, 12, 13, 14, 9, 9, 15, 16]  # 2 and 9 from the first file, 9 twice here
    for name, ids in (("part-0.parquet", first), ("part-1.parquet", second)):
        pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "prompt": [f"p{i}" for i in ids]}),
                       inputs / name, row_group_size=3)
    config = PipelineConfig(task="generate", input=str(inputs), output=str(tmp_path / "out"),
                            model=tiny_model("causal"), max_new_tokens=2, batch_size=1, rows_per_unit=3)
    plan = make_plan(config)
    assert len(plan.units) == 8 and plan.ids["duplicate_rows"] == 3 and plan.ids["duplicate_ids"] == 2
    runner = UnitRunner(config, plan.schema,
                         engine=Engine.from_pretrained(tiny_model("causal"), max_batch_size=1, device="cpu"))
    assert all(runner.run_unit(u)["status"] == "done" for u in plan.units)
    table = pq.read_table(tmp_path / "out")  # every unit's file
    assert_exactly_once(table["id"].to_pylist(), first + second)
    flagged = pq.read_table(tmp_path / "out", filters=[("error", "!=", "")])
    got = sorted((row["id"], error_of(row)) for row in flagged.to_pylist())
    assert got == [(2, ("duplicate_id", "id 2 already appeared at part-0.parquet row 2")),
                   (9, ("duplicate_id", "id 9 already appeared at part-0.parquet row 9")),
                   (9, ("duplicate_id", "id 9 already appeared at part-0.parquet row 9"))]
    out1 = pq.read_table(tmp_path / "out" / "part-1.rg00002-00002.parquet")  # rows 6-8 of part-1
    assert out1["id"].to_pylist() == [9, 9, 15] and out1["error"].null_count == 1
