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

from pipeline import PipelineConfig
from pipeline.formats import INPUT_FORMATS, OUTPUT_FORMATS, input_format, strip_suffix
from pipeline.plan import make_plan
from pipeline.storage import list_inputs, resolve


def config(**kw) -> PipelineConfig:
    return PipelineConfig(**{"input": "-", "output": "-", "model": "-", **kw})


def read_all(path, cfg: PipelineConfig):
    """Every row of a file through its format, and the per-row errors keyed by row number."""
    loc = resolve(str(path), cfg)
    fmt = input_format(str(path), cfg.input_format)
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
