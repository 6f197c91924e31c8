"""Log-probabilities through the pipeline, without Ray: --logprobs / --prompt-logprobs and the
per-row `logprobs` column on the generate stage, the `logprobs` / `prompt_logprobs` output
columns in Parquet, JSONL and OpenAI batch output (parsed with the `openai` package's types),
and the settings' place in a run's resume identity. Values are compared with the engine called
directly, which tests/test_logprobs.py checks against transformers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fixtures import PROMPTS, tiny_model, write_shards

from model import Engine, SamplingParams
from model.sampling_params import check_row
from pipeline import ConfigError, GenerateStage, PipelineConfig
from pipeline.cli import build_parser, config_from_args
from pipeline.openai_batch import (
    CHAT,
    COMPLETIONS,
    request_row,
    response_line,
    token_bytes,
)
from pipeline.plan import make_plan
from pipeline.stages import SAMPLED_LOGPROB, TOKEN_LOGPROB
from pipeline.unit_runner import UnitRunner


def cfg(**kw) -> PipelineConfig:
    base = dict(task="generate", input="in", output="out", model=tiny_model("causal"), max_new_tokens=4, batch_size=4)
    return PipelineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, dtype="float32", device="cpu")


def as_columns(completion, top: bool):
    """What the output columns should hold for a Completion's log-probabilities."""
    def one(t):
        return {"token_id": t.token_id, "token": t.token, "logprob": t.logprob}

    if completion is None:
        return None
    return [{**one(t), "top": [one(a) for a in t.top]} if top else one(t) for t in completion]


def test_stage_columns_equal_the_engine(engine):
    prompts = PROMPTS[:4]
    out = GenerateStage(cfg(logprobs=3, prompt_logprobs=True), engine=engine)({"id": [1, 2, 3, 4], "prompt": prompts})
    assert out.schema.field("logprobs").type == pa.list_(SAMPLED_LOGPROB)
    assert out.schema.field("prompt_logprobs").type == pa.list_(TOKEN_LOGPROB)
    direct = engine.generate(prompts, SamplingParams(max_new_tokens=4, logprobs=3, prompt_logprobs=True))
    rows = out.to_pylist()
    for r, c in zip(rows, direct):
        assert r["logprobs"] == as_columns(c.logprobs, top=True)
        assert r["prompt_logprobs"] == as_columns(c.prompt_logprobs, top=False)
        assert r["prompt_logprobs"][0]["logprob"] is None and r["prompt_logprobs"][0]["token"] == "|ENDOFTEXT|"
        assert [t["token_id"] for t in r["logprobs"]] == c.token_ids and len(r["logprobs"][0]["top"]) == 3
    # off by default: the columns are there (one schema per task), null
    plain = GenerateStage(cfg(), engine=engine)({"id": [1], "prompt": prompts[:1]}).to_pylist()[0]
    assert plain["logprobs"] is None and plain["prompt_logprobs"] is None
    assert plain["completion"] == rows[0]["completion"]  # asking for log-probabilities changes no token


def test_per_row_logprobs_columns(engine):
    batch = {"id": [1, 2, 3, 4], "prompt": PROMPTS[:4], "logprobs": [None, 2, "1", 99],
             "prompt_logprobs": [None, None, "true", None]}
    rows = GenerateStage(cfg(), engine=engine)(batch).to_pylist()
    assert rows[0]["logprobs"] is None and rows[0]["prompt_logprobs"] is None
    assert len(rows[1]["logprobs"][0]["top"]) == 2 and rows[1]["prompt_logprobs"] is None
    assert len(rows[2]["logprobs"][0]["top"]) == 1 and rows[2]["prompt_logprobs"] is not None
    assert rows[3]["error_kind"] == "invalid_sampling" and "logprobs: must be <= 20" in rows[3]["error"]
    assert check_row("logprobs", "3") == 3 and check_row("prompt_logprobs", "False") is False
    with pytest.raises(ValueError, match="^prompt_logprobs: expected true or false, got str .maybe.$"):
        check_row("prompt_logprobs", "maybe")


@pytest.mark.parametrize("output_format", ["parquet", "jsonl"])
def test_parquet_and_jsonl_outputs_hold_the_columns(tmp_path, engine, output_format):
    write_shards(str(tmp_path / "in"), shards=1, rows=3)
    config = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), logprobs=2, prompt_logprobs=True,
                 output_format=output_format).validate()
    plan = make_plan(config)
    assert UnitRunner(config, plan.schema, engine=engine).run_unit(plan.units[0])["status"] == "done"
    if output_format == "parquet":
        rows = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    else:
        rows = [json.loads(x) for x in (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()]
    table = pq.read_table(tmp_path / "in" / "part-00000.parquet").to_pylist()
    direct = engine.generate([r["prompt"] for r in table], SamplingParams(max_new_tokens=4, logprobs=2,
                                                                         prompt_logprobs=True))
    for r, c in zip(rows, direct):
        assert r["logprobs"] == as_columns(c.logprobs, top=True)
        assert r["prompt_logprobs"] == as_columns(c.prompt_logprobs, top=False)
    # the settings are part of what a committed output means: a rerun without them is refused
    assert len(make_plan(config).done) == 1
    with pytest.raises(ConfigError, match="different settings: logprobs="):
        make_plan(cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), prompt_logprobs=True,
                      output_format=output_format))


def test_openai_requests_with_logprobs_are_answered_in_openai_shape(tmp_path, engine):
    openai_types = pytest.importorskip("openai.types", reason="the openai package checks output lines")
    chat = {"custom_id": "c1", "url": CHAT, "body": {"messages": [{"role": "user", "content": "hi"}],
                                                    "logprobs": True, "top_logprobs": 2, "max_tokens": 4}}
    text = {"custom_id": "t1", "url": COMPLETIONS, "body": {"prompt": "Once upon a", "logprobs": 3, "max_tokens": 4}}
    plain = {"custom_id": "p1", "url": CHAT, "body": {"messages": [{"role": "user", "content": "hi"}],
                                                     "logprobs": False}}
    rows = [request_row(r, "id", "prompt") for r in (chat, text, plain)]
    assert [e for _, e in rows] == [None] * 3
    assert [r.get("logprobs") for r, _ in rows] == [2, 3, None]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (chat, text, plain)))
    config = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), input_format="openai-batch").validate()
    plan = make_plan(config)
    assert UnitRunner(config, plan.schema, engine=engine).run_unit(plan.units[0])["status"] == "done"
    lines = {x["custom_id"]: x for x in map(json.loads, (tmp_path / "out" / "r.jsonl").read_text().splitlines())}
    ref_chat, ref_text = engine.generate(["human: hi\n\nadept:", "Once upon a"],
                                         [SamplingParams(max_new_tokens=4, logprobs=2),
                                          SamplingParams(max_new_tokens=4, logprobs=3)])
    body = openai_types.chat.ChatCompletion.model_validate(lines["c1"]["response"]["body"])
    content = body.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in content] == [(t.token, t.logprob) for t in ref_chat.logprobs]
    assert [[a.logprob for a in c.top_logprobs] for c in content] == \
        [[a.logprob for a in t.top] for t in ref_chat.logprobs]
    assert all(c.bytes == token_bytes(c.token) for c in content)
    completion = openai_types.Completion.model_validate(lines["t1"]["response"]["body"])
    lp = completion.choices[0].logprobs
    assert lp.token_logprobs == [t.logprob for t in ref_text.logprobs] and len(lp.top_logprobs[0]) <= 3
    assert lp.text_offset[0] == 0 and lp.tokens == [t.token for t in ref_text.logprobs]
    assert lines["p1"]["response"]["body"]["choices"][0]["logprobs"] is None


def test_token_bytes_and_a_response_line_with_partial_characters():
    assert token_bytes("bytes:\\xe2\\x82") == [0xE2, 0x82] and token_bytes(" é") == [0x20, 0xC3, 0xA9]
    row = {"id": "q", "url": CHAT, "completion": "€", "finish_reason": "stop", "num_prompt_tokens": 3,
           "num_generated_tokens": 3, "error": None,
           "logprobs": [{"token_id": 5, "token": "bytes:\\xe2", "logprob": -0.5,
                         "top": [{"token_id": 5, "token": "bytes:\\xe2", "logprob": -0.5}]}]}
    content = response_line(row, "id", "m", 1)["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert content[0]["bytes"] == [0xE2] and content[0]["top_logprobs"][0]["bytes"] == [0xE2]


def test_flags_and_their_checks():
    args = build_parser().parse_args(["generate", "--input", "i", "--output", "o", "--model", "m",
                                      "--logprobs", "5", "--prompt-logprobs"])
    config = config_from_args(args)
    assert config.logprobs == 5 and config.prompt_logprobs is True
    assert config.sampling()["logprobs"] == 5
    with pytest.raises(ConfigError, match="logprobs"):
        cfg(logprobs=21)
    cfg(input_format="openai-batch", prompt_logprobs=True).validate()  # answered where vLLM puts them
    cfg(input_format="openai-batch", output_format="jsonl", prompt_logprobs=True).validate()


def test_openai_prompt_logprobs_where_vllm_puts_them(tmp_path, engine):
    """vLLM's `prompt_logprobs: 0` request field: the completion's `choices[0].prompt_logprobs`,
    the chat completion's top-level `prompt_logprobs`, null first, then {token id: {logprob,
    rank, decoded_token}}; the bodies still parse as OpenAI's types. N > 0 is that row's error."""
    openai_types = pytest.importorskip("openai.types", reason="the openai package checks output lines")
    chat = {"custom_id": "c1", "url": CHAT, "body": {"messages": [{"role": "user", "content": "hi"}],
                                                    "prompt_logprobs": 0, "max_tokens": 3}}
    text = {"custom_id": "t1", "url": COMPLETIONS, "body": {"prompt": "Once upon a", "prompt_logprobs": True,
                                                           "max_tokens": 3}}
    plain = {"custom_id": "p1", "url": COMPLETIONS, "body": {"prompt": "Once upon a", "max_tokens": 3}}
    top = {"custom_id": "x1", "url": COMPLETIONS, "body": {"prompt": "Once", "prompt_logprobs": 2}}
    bad = {"custom_id": "x2", "url": COMPLETIONS, "body": {"prompt": "Once", "prompt_logprobs": "yes"}}
    assert request_row(top, "id", "prompt")[1].message.startswith("body.prompt_logprobs=2: alternatives")
    assert "must be 0 or true" in request_row(bad, "id", "prompt")[1].message
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (chat, text, plain, top)))
    config = cfg(input=str(tmp_path / "in"), output=str(tmp_path / "out"), input_format="openai-batch").validate()
    plan = make_plan(config)
    assert UnitRunner(config, plan.schema, engine=engine).run_unit(plan.units[0])["status"] == "done"
    lines = {x["custom_id"]: x for x in map(json.loads, (tmp_path / "out" / "r.jsonl").read_text().splitlines())}
    ref_chat, ref_text = engine.generate(["human: hi\n\nadept:", "Once upon a"],
                                         SamplingParams(max_new_tokens=3, prompt_logprobs=True))

    def vllm_shape(completion):
        return [None] + [{str(t.token_id): {"logprob": t.logprob, "rank": None, "decoded_token": t.token}}
                         for t in completion.prompt_logprobs[1:]]

    chat_body = lines["c1"]["response"]["body"]
    openai_types.chat.ChatCompletion.model_validate(chat_body)
    assert chat_body["prompt_logprobs"] == vllm_shape(ref_chat) and len(chat_body["prompt_logprobs"]) > 3
    text_body = lines["t1"]["response"]["body"]
    openai_types.Completion.model_validate(text_body)
    assert text_body["choices"][0]["prompt_logprobs"] == vllm_shape(ref_text)
    assert "prompt_logprobs" not in lines["p1"]["response"]["body"]["choices"][0]
    assert lines["x1"]["error"]["code"] == "invalid_request" and lines["x1"]["response"] is None
