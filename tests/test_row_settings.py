"""Per-row sampling settings (pipeline/row_settings.py): input columns that override the run's
generate settings row by row. Each row is checked against `Engine.generate` called directly
with that row's settings spelled out; bad values fail only their own row."""

from __future__ import annotations

import json
import math

import jsonschema
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from pipeline_fixtures import PROMPTS, error_of, tiny_model

from model import Engine, SamplingParams
from model.sampling_params import check_row
from pipeline import GenerateStage, PipelineConfig
from pipeline.formats import CsvInput, JsonlInput
from pipeline.row_settings import checked
from pipeline.stages import row_seed


def cfg(**kw) -> PipelineConfig:
    base = dict(task="generate", input="in", output="out", model=tiny_model("causal"), batch_size=8)
    if kw.get("task", "generate") == "generate":  # another task refuses a generate setting
        base["max_new_tokens"] = 4
    return PipelineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(tiny_model("causal"), max_batch_size=8, dtype="float32", device="cpu")


def direct(engine, prompt: str, **params):
    return engine.generate([prompt], SamplingParams(**params))[0]


def test_a_rows_value_is_checked_leniently_by_its_fields_rules():
    assert check_row("temperature", "0.7") == 0.7  # CSV cells are text
    assert check_row("max_new_tokens", 16.0) == 16 and isinstance(check_row("max_new_tokens", 16.0), int)
    assert check_row("top_k", " 3 ") == 3
    assert check_row("stop", "\n") == ["\n"] and check_row("stop", ["a", "b"]) == ["a", "b"]
    assert check_row("stop", "a,b") == ["a,b"]  # a row's text is one stop string; the run's is comma-separated
    assert check_row("stop", []) is None  # empty keeps the run's stop strings, as null does
    assert check_row("json_schema", '{"type": "integer"}') == {"type": "integer"}
    for name in ("temperature", "max_new_tokens", "seed"):
        assert check_row(name, None) is None and check_row(name, "") is None and check_row(name, math.nan) is None
    assert check_row("prompt_logprobs", " false ") is False and check_row("seed", "1e3") == 1000
    for value in ("yes", 1, "1", "on"):  # the README's true / false only
        assert checked("prompt_logprobs", value)[1].message.startswith("prompt_logprobs: expected true or false")
    # numpy / pandas values, as a processor's preprocess may give them
    assert check_row("temperature", np.float64(0.5)) == 0.5 and check_row("max_new_tokens", np.int64(3)) == 3
    assert check_row("temperature", np.float64("nan")) is None and check_row("stop", np.array(["a", "b"])) == ["a", "b"]
    assert check_row("prompt_logprobs", np.bool_(True)) is True and check_row("stop", pd.Series(["x"])) == ["x"]
    for name, value, words in (("top_k", 2.5, "top_k: expected an integer, got float 2.5"),
                               ("temperature", True, "temperature: expected a number, got bool True"),
                               ("temperature", "hot", "temperature: expected a number, got str 'hot'"),
                               ("seed", -1, "seed: must be >= 0, got -1"),
                               ("seed", 2**63, "seed: must be < 9223372036854775808, got 9223372036854775808"),
                               ("seed", 1e20, "seed: must be < 9223372036854775808, got 100000000000000000000"),
                               ("top_p", "nan", "top_p: must be a finite number, got nan"),
                               ("temperature", math.inf, "temperature: must be a finite number, got inf"),
                               ("stop", 5, "stop: must be a string or a list of strings, got 5"),
                               ("stop", ["a", 1], "stop: expected a string, got int 1"),
                               ("json_schema", "{", "json_schema: not JSON (Expecting property name"),
                               ("json_schema", "[1]", "json_schema: must be a JSON object, got a list")):
        value, error = checked(name, value)
        assert value is None and error.kind == "invalid_sampling" and error.message.startswith(words), error


def test_each_sampling_setting_is_declared_once_for_the_run_its_rows_and_the_engine():
    """A SamplingSettings field is a run setting (flag, YAML key) of its name, with its declaration's
    help, and the generate task's result identity; those marked ROW are input columns."""
    from model.sampling_params import SamplingSettings
    from pipeline.cli import build_parser
    from pipeline.row_settings import RUN_SAMPLING, SAMPLING_COLUMNS

    declared = SamplingSettings.__pydantic_fields__
    assert issubclass(PipelineConfig, SamplingSettings) and issubclass(SamplingParams, SamplingSettings)
    assert set(RUN_SAMPLING) == set(declared) and set(SAMPLING_COLUMNS) < set(declared)
    assert {n for n, f in declared.items() if (f.json_schema_extra or {}).get("row")} == set(SAMPLING_COLUMNS)
    flags = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions}
    # the run's text is comma-separated (a flag, a YAML value); the engine's and a row's is one stop string
    assert PipelineConfig(stop="a,b").stop == ["a", "b"] and PipelineConfig(stop=None).stop == []
    assert SamplingParams(stop="a,b").stop == ["a,b"] == check_row("stop", "a,b")
    for name, f in declared.items():
        assert PipelineConfig.__pydantic_fields__[name].description == f.description
        assert flags[name].startswith(f.description.replace("%", "%%")), name
    generate = GenerateStage.result_fields(cfg())
    assert set(RUN_SAMPLING) <= set(generate)
    changed = cfg(top_p=0.5).sampling(seed=7)
    assert changed["seed"] == 7 and SamplingParams(**changed).top_p == 0.5


def test_rows_override_the_run_settings_and_bad_values_fail_only_their_row(engine):
    prompts = PROMPTS[:8]
    batch = {
        "id": list(range(8)),
        "prompt": prompts,
        "max_new_tokens": [2, None, 7, None, None, 3, None, 5],
        "temperature": [None, None, None, 0.9, -1, None, "0.8", None],
        "top_k": [None, None, None, None, None, 2.5, 5, None],
        "seed": [None, None, None, 7, None, None, None, None],
        "stop": [None, None, None, None, None, None, None, "e"],
    }
    rows = GenerateStage(cfg(seed=123), engine=engine)(batch).to_pylist()
    want = {
        0: dict(max_new_tokens=2),
        1: dict(max_new_tokens=4),
        2: dict(max_new_tokens=7),
        3: dict(max_new_tokens=4, temperature=0.9, seed=7),  # the row's seed, as given
        6: dict(max_new_tokens=4, temperature=0.8, top_k=5, seed=row_seed(123, 6)),  # seed derived from --seed
        7: dict(max_new_tokens=5, stop=["e"]),
    }
    for i, params in want.items():
        ref = direct(engine, prompts[i], **params)
        assert (rows[i]["completion"], rows[i]["finish_reason"], rows[i]["num_generated_tokens"]) == \
            (ref.text, ref.finish_reason, ref.num_generated_tokens), (i, params)
        assert rows[i]["error"] is None
    assert rows[0]["num_generated_tokens"] == 2 and rows[2]["num_generated_tokens"] <= 7
    assert error_of(rows[4]) == ("invalid_sampling", "temperature: must be >= 0, got -1")
    assert error_of(rows[5]) == ("invalid_sampling", "top_k: expected an integer, got float 2.5")
    assert rows[4]["completion"] is None and rows[4]["id"] == 4 and rows[5]["id"] == 5
    # the sampled row really sampled: another seed gives another text for at least one of a few seeds
    others = {direct(engine, prompts[3], max_new_tokens=4, temperature=0.9, seed=s).text for s in range(8, 14)}
    assert others - {rows[3]["completion"]}


def test_jsonl_rows_with_mixed_types_keep_their_neighbours(engine, tmp_path):
    lines = [{"id": 1, "prompt": PROMPTS[0], "temperature": 0},
             {"id": 2, "prompt": PROMPTS[1], "temperature": "0.5", "seed": 3},
             {"id": 3, "prompt": PROMPTS[2], "temperature": "hot"},
             {"id": 4, "prompt": PROMPTS[3], "max_new_tokens": 2, "stop": ["zz", "q"]},
             {"id": 5, "prompt": PROMPTS[4], "stop": 9}]
    raw = "".join(json.dumps(x) + "\n" for x in lines).encode()
    table, errors = JsonlInput()._parse(raw, cfg())
    assert errors == {2: ("invalid_sampling", "temperature: expected a number, got str 'hot' (line 3)"),
                      4: ("invalid_sampling", "stop: must be a string or a list of strings, got 9 (line 5)")}
    assert table["temperature"].to_pylist() == [0, 0.5, None, None, None]
    rows = GenerateStage(cfg(), engine=engine)(table, errors).to_pylist()
    ref = [direct(engine, PROMPTS[0], max_new_tokens=4), direct(engine, PROMPTS[1], max_new_tokens=4,
                                                                 temperature=0.5, seed=3),
           None, direct(engine, PROMPTS[3], max_new_tokens=2, stop=["zz", "q"]), None]
    for r, c in zip(rows, ref):
        if c is None:
            assert r["error_kind"] == "invalid_sampling" and r["completion"] is None
        else:
            assert (r["completion"], r["error"]) == (c.text, None)


def test_csv_settings_are_text_and_parse_per_row(engine):
    raw = (b"id,prompt,max_new_tokens,top_p\n"
           b"1,\"" + PROMPTS[0].encode() + b"\",3,\n"
           b"2,\"" + PROMPTS[1].encode() + b"\",,0\n"
           b"3,\"" + PROMPTS[2].encode() + b"\",,\n")
    table, errors = CsvInput()._parse(raw, cfg())
    rows = GenerateStage(cfg(), engine=engine)(table, errors).to_pylist()
    assert rows[0]["completion"] == direct(engine, PROMPTS[0], max_new_tokens=3).text
    assert error_of(rows[1]) == ("invalid_sampling", "top_p: must be > 0, got 0")
    assert rows[2]["completion"] == direct(engine, PROMPTS[2], max_new_tokens=4).text


def test_a_row_schema_constrains_only_that_row(engine):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    batch = pa.table({"id": [1, 2, 3], "prompt": PROMPTS[:3],
                      "json_schema": [json.dumps(schema), None, "not json"]})
    rows = GenerateStage(cfg(max_new_tokens=24), engine=engine)(batch).to_pylist()
    ref = direct(engine, PROMPTS[0], max_new_tokens=24, json_schema=schema)
    assert rows[0]["completion"] == ref.text
    if rows[0]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(rows[0]["parsed"]), schema)
    else:  # cut off by max_new_tokens: unparsed, and said so
        assert rows[0]["parsed"] is None
    assert rows[1]["completion"] == direct(engine, PROMPTS[1], max_new_tokens=24).text
    assert rows[1]["parsed"] is None
    assert str(error_of(rows[2])).startswith("invalid_sampling: json_schema: not JSON")


def test_other_tasks_ignore_setting_columns(engine):
    from pipeline import LabelStage

    batch = {"id": [1, 2], "prompt": PROMPTS[:2], "temperature": [-5, "hot"]}
    rows = LabelStage(cfg(task="label", choices=["yes", "no"]), engine=engine)(batch).to_pylist()
    assert all(r["error"] is None and r["label"] in ("yes", "no") for r in rows)
