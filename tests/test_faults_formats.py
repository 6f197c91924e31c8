"""Inputs and outputs that used to lose or confuse rows quietly (issue 20): mixed-case
extensions, files a directory listing leaves out, binary ids in JSON output, lone surrogates,
CSV quotes left open, JSON arrays, empty files, JSONL split on newlines only, corrupted or
differently typed committed outputs, and what the input fingerprint sees.

Each test states the row accounting it proves: every input row is exactly one output row."""

from __future__ import annotations

import io
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import read_all

from pipeline import PipelineConfig
from pipeline.formats import INPUT_FORMATS, input_format, strip_suffix
from pipeline.plan import make_plan
from pipeline.plan import list_inputs
from pipeline.storage import resolve


def config(**kw) -> PipelineConfig:
    return PipelineConfig(**{"input": "-", "output": "-", "model": "-", **kw})


# ---- input discovery ---------------------------------------------------------------------------
def test_extensions_match_in_any_case_and_left_out_files_are_named(tmp_path, caplog):
    """jan.csv, FEB.CSV and MAR.Parquet are all read (ERP exports write upper-case extensions);
    a file that is not read is named in a warning and in the listing's `left_out`."""
    (tmp_path / "jan.csv").write_text("id,prompt\n1,a\n2,b\n")
    (tmp_path / "FEB.CSV").write_text("id,prompt\n3,c\n4,d\n")
    pq.write_table(pa.table({"id": ["5", "6"], "prompt": ["e", "f"]}), tmp_path / "MAR.Parquet")
    (tmp_path / "x.JSONL.GZ").write_bytes(__import__("gzip").compress(b'{"id": "7", "prompt": "g"}\n'))
    (tmp_path / "notes.xlsx").write_text("not data")
    (tmp_path / "Info.JSON").write_text("{}")
    (tmp_path / "_SUCCESS").write_text("")  # a marker: never data, never reported
    with caplog.at_level(logging.WARNING, logger="pipeline.storage"):
        listed = list_inputs(str(tmp_path), config())
    assert sorted(f.name for f in listed) == ["FEB.CSV", "MAR.Parquet", "jan.csv", "x.JSONL.GZ"]
    assert sorted(os.path.basename(u) for u in listed.left_out) == ["Info.JSON", "notes.xlsx"]
    assert "2 file(s) in the input directory are not read as data (Info.JSON, notes.xlsx)" in caplog.text
    assert "--input-format jsonl" in caplog.text  # the .json file says how to read it
    assert [input_format(f.name).name for f in sorted(listed, key=lambda f: f.name)] == \
        ["csv", "parquet", "csv", "jsonl"]
    assert strip_suffix("MAR.Parquet") == "MAR" and strip_suffix("x.JSONL.GZ") == "x"

    plan = make_plan(config(input=str(tmp_path), output=str(tmp_path / "out"), check_duplicate_ids=True))
    assert sorted(u.output_name for u in plan.units) == ["FEB.parquet", "MAR.parquet", "jan.parquet", "x.parquet"]
    assert sum(u.num_rows for u in plan.units) == 7
    rows, _ = read_all(tmp_path / "x.JSONL.GZ", config())  # decompressed by its upper-case suffix
    assert rows == [{"id": "7", "prompt": "g"}]


# ---- text ----------------------------------------------------------------------------------------
def test_a_lone_surrogate_fails_its_row_and_its_neighbours_are_read(tmp_path):
    """`"\\ud83d"` (half an emoji, as JavaScript writes a string cut mid-pair) is valid JSON but no
    UTF-8 text: it is its row's invalid_prompt (or invalid_id, or an invalid_line for another
    column); the rows around it are read, and a whole emoji escaped as a pair is ordinary text."""
    lines = ['{"id": 1, "prompt": "fine"}',
             '{"id": 2, "prompt": "cut \\ud83d here"}',
             '{"id": 3, "prompt": "a whole emoji \\ud83d\\ude00"}',
             '{"id": 4, "prompt": "kept column", "meta": ["ok", "\\udc00"]}',
             '{"id": "\\ud800", "prompt": "surrogate id"}',
             '{"id": 6, "prompt": "last"}']
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    rows, errors = read_all(tmp_path / "s.jsonl", config(keep_columns=["meta"]))
    assert [r["id"] for r in rows] == [1, 2, 3, 4, None, 6]
    assert rows[2]["prompt"] == "a whole emoji \U0001F600" and rows[5]["prompt"] == "last"
    assert errors == {1: ("invalid_prompt", "lone surrogate U+D83D at position 4 (line 2)"),
                      3: ("invalid_line", "column 'meta' holds a lone surrogate U+DC00 at position 0, which is not "
                                          "text (line 4)"),
                      4: ("invalid_id", "the id holds a lone surrogate U+D800 at position 0 (line 5)")}


def test_jsonl_outputs_are_read_back_split_on_newlines_only(tmp_path):
    """U+2028, U+2029, \\x1c-\\x1e and \\x85 are line breaks to str.splitlines() but ordinary
    characters inside JSON strings: a label rerun that re-reads a JSONL output's margins must
    not split there."""
    from pipeline.stages import _margins

    odd = "a\u2028b\u2029c\x1cd\x1de\x1ef\x85g\x0bh\x0ci"
    path = tmp_path / "o.jsonl"
    path.write_text("".join(json.dumps({"id": i, "note": odd, "margin": m}, ensure_ascii=False) + "\n"
                            for i, m in enumerate([0.5, 0.01])), encoding="utf-8")
    assert _margins(resolve(str(path), config())) == [0.5, 0.01]


def test_a_bom_at_the_start_of_a_jsonl_input_is_not_part_of_the_first_row(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "first"}\n{"id": 2, "prompt": "second"}\n')
    rows, errors = read_all(tmp_path / "bom.jsonl", config())
    assert rows == [{"id": 1, "prompt": "first"}, {"id": 2, "prompt": "second"}] and errors == {}


def test_a_csv_quote_left_open_is_one_error_row_and_never_swallows_its_neighbours(tmp_path):
    """A naive export of a text that starts with `"` opens a quote it never closes: a CSV parser
    reads every following line into that field, until a later quote closes it (7 data lines
    were 4 rows, no error) or the file ends. The record is its own invalid_row and each line
    after it a row: every data line is one row."""
    later_quote = ('id,prompt,meta\n1,a,x\n2,"open quote,y\n3,c,z\n4,"quoted",w\n5,e,v\n6,"multi\nline",u\n'
                   '7,g,t\n')
    (tmp_path / "later.csv").write_text(later_quote)
    rows, errors = read_all(tmp_path / "later.csv", config(keep_columns=["meta"]))
    assert [r["id"] for r in rows] == ["1", "3", "4", "5", "6", "7", None]
    assert rows[2]["prompt"] == "quoted" and rows[4]["prompt"] == "multi\nline"
    assert list(errors) == [6] and str(errors[6]).startswith(
        "invalid_row: record 3 (line 3) opens a quoted field that closes only at line 5, mid-field "
        "('2,\"open quote,y')")

    (tmp_path / "eof.csv").write_text('id,prompt\n1,a\n2,"never closed\n3,c\n4,broken,extra\n5,e\n')
    rows, errors = read_all(tmp_path / "eof.csv", config())
    assert [r["id"] for r in rows] == ["1", "3", "5", None, None]
    assert str(errors[3]).startswith("invalid_row: record 3 (line 3) opens a quoted field that never closes")
    assert errors[4] == ("invalid_row", "record 5 does not parse as CSV ('4,broken,extra')")  # numbered in the file

    # well-formed quoting is untouched: line breaks, escaped quotes, empty and quote-only fields
    (tmp_path / "ok.csv").write_text('id,prompt\r\n1,"say ""hi""\r\nthere"\r\n2,""\r\n3,""""\r\n4,5" tall\r\n')
    rows, errors = read_all(tmp_path / "ok.csv", config())
    assert [r["prompt"] for r in rows] == ['say "hi"\r\nthere', "", '"', '5" tall'] and errors == {}


# ---- JSON arrays and empty files -----------------------------------------------------------------
def test_a_json_array_of_objects_is_read_as_rows(tmp_path):
    """The usual "JSON export": one array of objects, pretty-printed. Each element is a row; an
    element that is not an object is that row's error. A broken array, or one object over many
    lines, is a bad file naming the fix, not one invalid_line per line."""
    records = [{"id": i, "prompt": f"prompt {i}"} for i in range(10)]
    (tmp_path / "export.json").write_text(json.dumps(records[:5] + [7] + records[5:], indent=2))
    rows, errors = read_all(tmp_path / "export.json", config())
    assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, None, 5, 6, 7, 8, 9]
    assert errors == {5: ("invalid_row", "element 6 holds a JSON number, not an object")}
    (tmp_path / "one-line.json").write_text(json.dumps(records[:2]))
    assert [r["id"] for r in read_all(tmp_path / "one-line.json", config())[0]] == [0, 1]

    cfg = config()
    (tmp_path / "cut.json").write_text(json.dumps(records, indent=2)[:-40])
    problem = INPUT_FORMATS["jsonl"].inspect(resolve(str(tmp_path / "cut.json"), cfg), cfg).problem
    assert "starts a JSON array that does not parse" in problem
    (tmp_path / "object.json").write_text(json.dumps({"data": records}, indent=2))
    problem = INPUT_FORMATS["jsonl"].inspect(resolve(str(tmp_path / "object.json"), cfg), cfg).problem
    assert "holds one JSON object over" in problem and "one object per line" in problem
    # JSONL whose lines are arrays is still JSONL: each line one (bad) row
    (tmp_path / "arrays.jsonl").write_text('[1, 2]\n{"id": 1, "prompt": "x"}\n')
    rows, errors = read_all(tmp_path / "arrays.jsonl", cfg)
    assert [r["id"] for r in rows] == [None, 1] and str(errors[0]).startswith("invalid_line: line 1 holds a JSON array")


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", b""), ("blank.jsonl", b"\n \n"), ("array.json", b"[]"), ("empty.csv", b""),
    ("header.csv", b"id,prompt\n"), ("empty.parquet", None)])
def test_an_empty_input_of_any_format_is_0_rows(tmp_path, name, content):
    """An empty file is a bad input named before any model work, with 0 rows: skipped with
    --on-bad-input skip, it leaves nothing missing (before, an empty .jsonl had an unknown
    row count, so the run said incomplete)."""
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2]), "prompt": ["a", "b"]}), src / "a.parquet")
    if content is None:
        pq.write_table(pa.table({"id": pa.array([], pa.int64()), "prompt": pa.array([], pa.string())}), src / name)
    else:
        (src / name).write_bytes(content)
    plan = make_plan(config(input=[str(src / "a.parquet"), str(src / name)], output=str(tmp_path / "out"),
                            on_bad_input="skip"))
    assert [(os.path.basename(b["input"]), b["error"], b["rows"]) for b in plan.bad_inputs] == \
        [(name, "empty (0 rows)", 0)]


# ---- ids keep their identity in every output format -----------------------------------------------
class EchoEngine:
    """Completion = the prompt reversed; no model."""

    def generate(self, prompts, params):
        from model import Completion

        return [Completion(text=p[::-1], finish_reason="stop", num_prompt_tokens=1, num_generated_tokens=1)
                for p in prompts]


def _run_units(cfg: PipelineConfig):
    from pipeline.unit_runner import UnitRunner

    plan = make_plan(cfg)
    runner = UnitRunner(cfg, plan.schema, engine=EchoEngine())
    assert all(runner.run_unit(u)["status"] == "done" for u in plan.todo)
    return plan


def _jsonl_rows(directory) -> list[dict]:
    return [json.loads(line) for name in sorted(os.listdir(directory)) if name.endswith(".jsonl")
            for line in (directory / name).read_bytes().split(b"\n") if line]


BINARY_IDS = [b"\xff", b"\\xff", b"a", b"a\x00", b"", b"\xed\xa0\x80"]
STRING_IDS = ["a\nb", "a\\nb", "a\u2028b", "caf\u00e9", "cafe\u0301", "a b", "a", "a\x00"]


@pytest.mark.parametrize("output_format", ["parquet", "jsonl"])
def test_distinct_binary_ids_stay_distinct_in_every_output_format(tmp_path, output_format):
    """b"\\xff" and b"\\\\xff" are two ids; in JSONL both became the string "\\\\xff". JSON output
    now writes bytes as "base64:..." (lossless, documented); Parquet keeps them as binary."""
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": pa.array(BINARY_IDS, pa.binary()),
                             "prompt": [f"prompt {i}" for i in range(len(BINARY_IDS))]}), src / "b.parquet")
    out = tmp_path / "out"
    _run_units(config(task="generate", input=str(src), output=str(out), output_format=output_format))
    if output_format == "parquet":
        ids = pq.read_table(out / "b.parquet")["id"].to_pylist()
    else:
        import base64

        written = [row["id"] for row in _jsonl_rows(out)]
        assert all(i.startswith("base64:") for i in written)
        ids = [base64.b64decode(i[len("base64:"):]) for i in written]
    assert ids == BINARY_IDS  # every id, each once, as it was


@pytest.mark.parametrize("output_format", ["parquet", "jsonl", "openai-batch"])
def test_distinct_string_ids_stay_distinct_in_every_output_format(tmp_path, output_format):
    """Ids that differ only by a newline, its escape, U+2028, Unicode normalisation or a NUL
    are distinct in every output, and an openai-batch answer's own `id` is distinct per request."""
    src = tmp_path / "in"
    src.mkdir()
    if output_format == "openai-batch":
        lines = [{"custom_id": i, "method": "POST", "url": "/v1/completions", "body": {"prompt": f"p{k}"}}
                 for k, i in enumerate(STRING_IDS)]
        (src / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        cfg = config(task="generate", input=str(src), output=str(tmp_path / "out"), input_format="openai-batch")
    else:
        (src / "r.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"p{k}"}) + "\n"
                                             for k, i in enumerate(STRING_IDS)))
        cfg = config(task="generate", input=str(src), output=str(tmp_path / "out"), output_format=output_format)
    _run_units(cfg)
    out = tmp_path / "out"
    if output_format == "parquet":
        assert pq.read_table(out / "r.parquet")["id"].to_pylist() == STRING_IDS
        return
    rows = _jsonl_rows(out)
    key = "custom_id" if output_format == "openai-batch" else "id"
    assert [r[key] for r in rows] == STRING_IDS
    if output_format == "openai-batch":
        assert len({r["id"] for r in rows}) == len(STRING_IDS) and all(r["error"] is None for r in rows)


# ---- committed outputs ---------------------------------------------------------------------------
def _zero_data(path) -> None:
    """Zero a Parquet file's data pages, keeping its footer (and so its statistics) intact."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4: len(data) - 8 - footer] = bytes(len(data) - 12 - footer)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("output_format, whole_read", [("parquet", True), ("parquet", False), ("jsonl", True)])
def test_a_committed_output_whose_data_was_damaged_is_recomputed(tmp_path, caplog, monkeypatch, output_format,
                                                                 whole_read):
    """Zeroed data pages under an intact footer ("Corrupt snappy" on read), or a JSONL output
    overwritten with bytes of the same size: the checksum written with the output no longer
    matches, so the rerun does not skip it as committed but computes it again. (A small
    Parquet output is read in one call with its footer, a large one streamed: both checked.)"""
    from pipeline import formats
    from pipeline.unit_runner import UnitRunner

    if not whole_read:
        monkeypatch.setattr(formats, "WHOLE_READ_BYTES", 0)

    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"id": list(range(50)), "prompt": [f"prompt number {i} " * 5 for i in range(50)]}),
                   src / "a.parquet")
    cfg = config(task="generate", input=str(src), output=str(tmp_path / "out"), output_format=output_format)
    _run_units(cfg)
    out = tmp_path / "out" / f"a.{output_format}"
    good = out.read_bytes()
    assert list(make_plan(cfg).done) == [out.name]
    if output_format == "parquet":
        _zero_data(out)
        with pytest.raises(Exception):
            pq.read_table(out)
    else:
        out.write_bytes(good.replace(b"prompt", b"PROMPT"))  # the same size: the old check passed it
    with caplog.at_level(logging.WARNING, logger="pipeline.formats"):
        plan = make_plan(cfg)
    assert plan.done == {} and [u.output_name for u in plan.todo] == [out.name]
    assert f"output {out} is damaged" in caplog.text
    stats = UnitRunner(cfg, plan.schema, engine=EchoEngine()).run_unit(plan.todo[0])
    assert stats["status"] == "done"  # recomputed: the same rows as before the damage
    if output_format == "parquet":
        assert pq.read_table(out).equals(pq.read_table(io.BytesIO(good)))
    else:
        assert out.read_bytes() == good


def test_a_kept_column_of_nulls_typed_by_a_later_partition_keeps_one_dataset(tmp_path):
    """The first run's file had the kept column all null (no type); a partition added later has
    strings in it. The committed output is rewritten with the column typed (its rows and
    statistics unchanged, nothing recomputed), so the directory reads as one dataset."""
    import pyarrow.dataset as ds

    src, out = tmp_path / "in", tmp_path / "out"
    (src / "day=1").mkdir(parents=True)
    (src / "day=1" / "a.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"p{i}", "meta": None}) + "\n"
                                                   for i in range(3)))
    cfg = config(task="generate", input=str(src), output=str(out), keep_columns=["meta"])
    _run_units(cfg)
    first = pq.ParquetFile(out / "day=1__a.parquet")
    assert first.schema_arrow.field("meta").type == pa.null()
    (src / "day=2").mkdir()
    (src / "day=2" / "b.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"p{i}", "meta": f"m{i}"}) + "\n"
                                                   for i in range(3, 6)))
    plan = _run_units(cfg)
    assert list(plan.done) == ["day=1__a.parquet"]  # committed before: not computed again
    table = ds.dataset(out, format="parquet").to_table()
    assert sorted(table["id"].to_pylist()) == list(range(6)) and table.schema.field("meta").type == pa.string()
    rewritten = pq.ParquetFile(out / "day=1__a.parquet")
    footer = lambda f: json.loads(f.metadata.metadata[b"persimmon_batch"])  # noqa: E731
    assert {k: v for k, v in footer(rewritten).items() if k != "data_sha256"} == \
        {k: v for k, v in footer(first).items() if k != "data_sha256"}
    assert list(make_plan(cfg).done) == ["day=1__a.parquet", "day=2__b.parquet"]  # and it is still committed


# ---- what the input fingerprint sees -------------------------------------------------------------
def test_rows_swapped_in_a_parquet_input_at_the_same_size_and_mtime_are_seen(tmp_path):
    """Two rows swapped within one row group, the file's size and mtime kept (cp -p, rsync -t):
    the footer, statistics included, is byte for byte the same, so a footer hash cannot see it;
    the ids' stored bytes moved, and the unit is stale and recomputed."""
    import hashlib

    src = tmp_path / "in"
    src.mkdir()
    path = src / "a.parquet"
    rows = [(i, f"prompt {i}") for i in range(8)]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}), path)
    cfg = config(task="generate", input=str(src), output=str(tmp_path / "out"))
    _run_units(cfg)
    before, footer_before = os.stat(path), pq.ParquetFile(path).metadata.to_dict()
    rows[2], rows[5] = rows[5], rows[2]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "prompt": [r[1] for r in rows]}), path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    digest = lambda d: hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).digest()  # noqa: E731
    assert digest(pq.ParquetFile(path).metadata.to_dict()) == digest(footer_before)  # the footer cannot tell
    plan = make_plan(cfg)
    assert plan.done == {} and [s["output"] for s in plan.stale] == ["a.parquet"]
    _run_units(cfg)
    assert pq.read_table(tmp_path / "out" / "a.parquet")["id"].to_pylist() == [0, 1, 5, 3, 4, 2, 6, 7]
