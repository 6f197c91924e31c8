"""What can be checked on the driver is, before Ray starts, with exit 2 and one line naming the
fix (issue 20): a prompt template a text cannot fill, a regex no text matches, a tokenizer that
does not load, a KV pool too small for one full-length row, a YAML file that does not parse.
And what only the engine sees is a row's error of the right kind: a row's own json_schema
that cannot be compiled is `invalid_sampling`, a constraint no text satisfies a
`grammar_error`, never an empty "stop" completion."""

from __future__ import annotations

import os
import shutil

import pytest
from pipeline_fixtures import tiny_model, write_shards

from model import Engine, SamplingParams
from model.structured import check_grammar
from pipeline import GenerateStage, PipelineConfig
from pipeline.cli import main

UNSATISFIABLE = r"[a&&b]"  # an empty character class: it compiles, but no text matches it


@pytest.fixture
def no_ray():
    import ray

    assert not ray.is_initialized(), "a previous test module left Ray running"
    yield
    assert not ray.is_initialized(), "Ray was started for a run that should have failed on the driver"


def _fails_on_the_driver(tmp_path, capsys, *flags, model=None) -> str:
    """Run the CLI; it must exit 2 with one line on stderr, write no output and start no Ray."""
    inputs = tmp_path / "in"
    if not inputs.exists():
        write_shards(str(inputs), shards=1, rows=2)
    code = main(["generate", "--input", str(inputs), "--output", str(tmp_path / "out"),
                 "--model", model or tiny_model("causal"), "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    return err


def test_a_prompt_template_a_text_cannot_fill_fails_the_config_check(tmp_path, capsys, no_ray):
    err = _fails_on_the_driver(tmp_path, capsys, "--prompt-template", "{prompt:d}")
    assert err == ("persimmon-batch: error: prompt_template: '{prompt:d}' cannot be filled with a text prompt "
                   "(Unknown format code 'd' for object of type 'str'); write {prompt} without a format spec")
    PipelineConfig(input="i", output="o", model="m", prompt_template="[{prompt:>8}]").validate()  # str specs are fine


def test_a_regex_no_text_matches_fails_on_the_driver(tmp_path, capsys, no_ray):
    assert check_grammar(regex=UNSATISFIABLE).startswith("no text matches it")
    assert check_grammar(regex=r"[^\s\S]").startswith("no text matches it")
    assert check_grammar(regex=r"a{0}") == "" and check_grammar(regex=r"\d{3}") == ""  # "" and "123" match
    err = _fails_on_the_driver(tmp_path, capsys, "--regex", UNSATISFIABLE)
    assert err.startswith("persimmon-batch: error: regex: no text matches it")


def test_a_constraint_no_text_satisfies_is_a_row_error_not_an_empty_stop():
    """The engine's own guard, for constraints that reach it (the Python API, a row's schema):
    the first mask allows only EOS, which used to end the row "stop" with '' that does not
    match; now it is that row's grammar_error, and its neighbour runs."""
    engine = Engine.from_pretrained(tiny_model("causal"), device="cpu")
    bad, good = engine.generate(["hello", "hello"], [SamplingParams(max_new_tokens=6, regex=UNSATISFIABLE),
                                                     SamplingParams(max_new_tokens=6, regex=r"[ab]{3}")])
    assert (bad.finish_reason, bad.error_kind, bad.text) == ("error", "grammar_error", "")
    assert "\n" not in bad.error and "no text can continue the constraint" in bad.error
    assert good.finish_reason == "stop" and len(good.text) == 3 and set(good.text) <= {"a", "b"}


def test_a_rows_own_json_schema_that_cannot_compile_is_invalid_sampling():
    """A per-row json_schema is a setting of that row: its compile error is `invalid_sampling`
    (it was reported as `invalid_prompt`, blaming the prompt)."""
    config = PipelineConfig(task="generate", input="-", output="-", model=tiny_model("causal"), max_new_tokens=4)
    stage = GenerateStage(config, engine=Engine.from_pretrained(tiny_model("causal"), device="cpu"))
    out = stage({"id": [1, 2], "prompt": ["a", "b"],
                 "json_schema": ['{"type": "string", "minLength": 3, "maxLength": 1}', None]}).to_pylist()
    assert out[0]["error"].startswith("invalid_sampling: invalid grammar: Unsatisfiable schema: minLength (3)")
    assert out[1]["error"] is None and out[1]["finish_reason"] in ("stop", "length")


def test_a_tokenizer_that_does_not_load_fails_on_the_driver(tmp_path, capsys, no_ray):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("causal"), model)
    data = (model / "tokenizer.model").read_bytes()
    (model / "tokenizer.model").write_bytes(data[: len(data) // 3])  # a cut download
    err = _fails_on_the_driver(tmp_path, capsys, model=str(model))
    assert "its tokenizer cannot be used" in err and "put the model's own tokenizer.model" in err


def test_a_kv_pool_below_one_full_length_row_fails_on_the_driver(tmp_path, capsys, no_ray):
    """The tiny model in float32: 1 KiB of KV per token, max_seq_len 512 = 32 blocks of 16, plus
    the runner's 2 reserved blocks: 34 KiB. 12 blocks hold 160 tokens: not one full row."""
    twelve_blocks = 12 * 16 * 1024 / 2**30
    err = _fails_on_the_driver(tmp_path, capsys, "--kv-cache-gib", repr(twelve_blocks))
    assert err.endswith("holds 160 tokens (1 KiB a token in float32), fewer than one row of max_seq_len=512: "
                        "use --kv-cache-gib 0.001 or more, or --max-seq-len 160 or less")
    err = _fails_on_the_driver(tmp_path, capsys, "--kv-cache-gib", "1e-9")  # below the runner's minimum
    assert "holds 0 tokens" in err and "--max-seq-len" not in err
    from pipeline.modelcheck import check_model

    check_model(PipelineConfig(input="-", output="-", model=tiny_model("causal"), kv_cache_gib=twelve_blocks,
                               max_seq_len=160))  # 160 tokens fit exactly: fine
    check_model(PipelineConfig(task="generate", input="-", output="-", model=tiny_model("causal"),
                               kv_cache_gib=34 * 16 * 1024 / 2**30))


@pytest.mark.parametrize("text, where", [("input: in\n\tmodel: m\n", "line 2 column 1"),
                                         ("input: [a, b\nmodel: m\n", "line 2 column")])
def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path, capsys, no_ray, text, where):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    assert main(["generate", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path} {where}" in err and "not valid YAML" in err, err
