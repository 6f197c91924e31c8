"""OpenAI Batch API files in and out (pipeline/openai_batch.py).

Requests are rendered as the Persimmon chat format says (literals below); answers are checked
against `Engine.generate` on those prompts with the request's settings, and every output line
is parsed with the `openai` package's own response types (a test dependency), so the tooling
that reads OpenAI's batch results reads ours."""

from __future__ import annotations

import json
import os

import pytest
from pipeline_fixtures import tiny_model

from model import Engine, SamplingParams
from pipeline import ConfigError, PipelineConfig, run_generate
from pipeline.openai_batch import CHAT, COMPLETIONS, RequestError, render_chat, request_row, response_line

openai_types = pytest.importorskip("openai.types", reason="the openai package (a test extra) checks output lines")


def user(text):
    return {"role": "user", "content": text}


def test_chat_rendering_literals():
    assert render_chat([user("hi")]) == "human: hi\n\nadept:"
    assert render_chat([{"role": "system", "content": "Be brief."}, user("hi"),
                        {"role": "assistant", "content": "hello"},
                        {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "you?"}]}]) \
        == "Be brief.\n\nhuman: hi\n\nadept: hello\n\nhuman: and you?\n\nadept:"
    for messages, words in (([], "non-empty"), ([{"role": "assistant", "content": "x"}], "expected a user"),
                            ([user("a"), {"role": "assistant", "content": "b"}], "last message"),
                            ([user("a"), {"role": "system", "content": "s"}], "only come before"),
                            ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text"),
                            ([{"role": "tool", "content": "x"}], "unsupported role")):
        with pytest.raises(RequestError, match=words):
            render_chat(messages)


def test_request_fields_and_refusals():
    row, err = request_row({"custom_id": "a", "method": "POST", "url": CHAT,
                            "body": {"model": "gpt-4o", "messages": [user("x")], "max_tokens": 5, "temperature": 0.5,
                                     "seed": 3, "stop": "\n", "response_format": {"type": "json_object"}}},
                           "id", "prompt")
    assert err is None and row == {"id": "a", "url": CHAT, "prompt": "human: x\n\nadept:", "max_new_tokens": 5,
                                   "temperature": 0.5, "seed": 3, "stop": "\n", "json_schema": {"type": "object"}}
    row, err = request_row({"custom_id": "b", "url": COMPLETIONS, "body": {"prompt": ["once"], "max_completion_tokens": 2,
                                                                          "max_tokens": 9}}, "id", "prompt")
    assert err is None and row["prompt"] == "once" and row["max_new_tokens"] == 2
    for req, words in (({"url": CHAT, "body": {"messages": [user("x")]}}, "custom_id"),
                       ({"custom_id": "c", "url": "/v1/embeddings", "body": {}}, "url must be"),
                       ({"custom_id": "c", "method": "GET", "url": CHAT, "body": {}}, "method must be POST"),
                       ({"custom_id": "c", "url": CHAT, "body": {"messages": [user("x")], "n": 2}}, "body.n=2"),
                       ({"custom_id": "c", "url": CHAT, "body": {"messages": [user("x")], "top_logprobs": 2}},
                        "needs body.logprobs: true"),
                       ({"custom_id": "c", "url": CHAT, "body": {"messages": [user("x")], "logprobs": True,
                                                                "top_logprobs": 21}}, "top_logprobs must be"),
                       ({"custom_id": "c", "url": COMPLETIONS, "body": {"prompt": "a", "echo": True}}, "echo"),
                       ({"custom_id": "c", "url": COMPLETIONS, "body": {"prompt": ["a", "b"]}}, "one string"),
                       ({"custom_id": "c", "url": CHAT, "body": {"messages": [user("x")],
                                                                "response_format": {"type": "json_schema"}}}, "schema")):
        row, err = request_row(req, "id", "prompt")
        assert err is not None and err.kind == "invalid_request" and words in err.message, (req, err)
        assert row["id"] == req.get("custom_id")  # a bad request keeps its custom_id


def test_response_lines_parse_with_openai_types():
    ok = {"id": "q", "url": CHAT, "completion": "fine", "finish_reason": "stop", "num_prompt_tokens": 7,
          "num_generated_tokens": 2, "error": None}
    line = response_line(ok, "id", "persimmon-8b-chat", 1700000000)
    body = openai_types.chat.ChatCompletion.model_validate(line["response"]["body"])
    assert body.choices[0].message.content == "fine" and body.usage.total_tokens == 9
    assert line["custom_id"] == "q" and line["error"] is None and line["response"]["status_code"] == 200
    text = response_line({**ok, "url": COMPLETIONS, "finish_reason": "length"}, "id", "m", 1)
    parsed = openai_types.Completion.model_validate(text["response"]["body"])
    assert parsed.choices[0].text == "fine" and parsed.choices[0].finish_reason == "length"
    bad = response_line({"id": "r", "error_kind": "invalid_request", "error": "url must be ..."}, "id", "m", 1)
    assert bad["response"] is None and bad["error"] == {"code": "invalid_request", "message": "url must be ..."}
    assert response_line(ok, "id", "m", 5)["id"] == response_line(ok, "id", "m", 9)["id"]  # stable across reruns
    unreadable = [response_line({"id": None, "error_kind": "invalid_line", "error": f"line {n} is not JSON"}, "id", "m",
                                1)["id"]
                  for n in (3, 4)]
    assert unreadable[0] != unreadable[1]  # lines without a custom_id still get distinct ids


@pytest.mark.ray
def test_openai_batch_file_round_trip(ray_local, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    requests = [
        {"custom_id": "chat-1", "method": "POST", "url": CHAT,
         "body": {"model": "x", "messages": [user("Name a colour.")], "max_tokens": 5}},
        {"custom_id": "chat-2", "method": "POST", "url": CHAT,
         "body": {"messages": [{"role": "system", "content": "Short answers."}, user("hi"),
                               {"role": "assistant", "content": "hello"}, user("Count to three.")],
                  "temperature": 0.8, "seed": 11, "max_tokens": 6}},
        {"custom_id": "text-1", "method": "POST", "url": COMPLETIONS, "body": {"prompt": "Once upon a", "max_tokens": 4}},
        {"custom_id": "json-1", "method": "POST", "url": CHAT,
         "body": {"messages": [user("Is it ok?")], "max_tokens": 24,
                  "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}}},
        {"custom_id": "bad-1", "method": "POST", "url": CHAT, "body": {"messages": [user("x")], "n": 3}},
        {"custom_id": "bad-2", "method": "POST", "url": CHAT, "body": {"messages": [user("x")], "temperature": -2}},
    ]
    (src / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in requests) + "not json\n")
    args = dict(input=str(src), output=str(out), model=tiny_model("causal"), replicas=1, max_new_tokens=3,
                input_format="openai-batch")
    report = run_generate(**args)
    assert report["complete"] and report["rows_in"] == report["rows_written"] == 7
    assert sorted(os.listdir(out)) == ["_run_report.json", "_stats", "requests.jsonl"]
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    by_id = {x["custom_id"]: x for x in lines}
    assert len(lines) == 7 and set(by_id) == {"chat-1", "chat-2", "text-1", "json-1", "bad-1", "bad-2", None}

    engine = Engine.from_pretrained(tiny_model("causal"), device="cpu")
    refs = engine.generate(
        ["human: Name a colour.\n\nadept:",
         "Short answers.\n\nhuman: hi\n\nadept: hello\n\nhuman: Count to three.\n\nadept:",
         "Once upon a", "human: Is it ok?\n\nadept:"],
        [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=6, temperature=0.8, seed=11),
         SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=24, json_schema=schema)])
    for cid, ref in zip(("chat-1", "chat-2", "json-1"), (refs[0], refs[1], refs[3])):
        body = openai_types.chat.ChatCompletion.model_validate(by_id[cid]["response"]["body"])
        assert body.choices[0].message.content == ref.text, cid
        assert body.usage.completion_tokens == ref.num_generated_tokens and body.model == "causal"
        assert body.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    text = openai_types.Completion.model_validate(by_id["text-1"]["response"]["body"])
    assert text.choices[0].text == refs[2].text and text.object == "text_completion"
    assert by_id["bad-1"]["error"]["code"] == "invalid_request" and "body.n=3" in by_id["bad-1"]["error"]["message"]
    assert by_id["bad-2"]["error"]["code"] == "invalid_sampling"  # the column is float: -2 reads as -2.0
    assert by_id["bad-2"]["error"]["message"].startswith("temperature: must be >= 0, got -2")
    assert by_id[None]["error"]["code"] == "invalid_line" and by_id[None]["response"] is None
    assert report["errors_by_kind"] == {"invalid_request": 1, "invalid_sampling": 1, "invalid_line": 1}

    again = run_generate(**args)  # resumes: the committed file is kept
    assert again["complete"] and again["units"]["skipped"] == 1 and again["units"]["done"] == 0


def test_openai_batch_options_are_checked():
    base = dict(input="i", output="o", model="m")
    with pytest.raises(ConfigError, match="generate only"):
        PipelineConfig(task="label", choices=["a", "b"], input_format="openai-batch", **base).validate()
    with pytest.raises(ConfigError, match="answers openai-batch input"):
        PipelineConfig(task="generate", output_format="openai-batch", **base).validate()
    with pytest.raises(ConfigError, match="do not apply"):
        PipelineConfig(task="generate", input_format="openai-batch", chat_template=True, **base).validate()
    cfg = PipelineConfig(task="generate", input_format="openai-batch", **base).validate()
    assert cfg.output_format == "openai-batch"
    assert PipelineConfig(task="generate", input_format="openai-batch", output_format="parquet", **base) \
        .validate().output_format == "parquet"


def test_a_request_that_says_prompt_logprobs_false_turns_the_runs_setting_off():
    """`prompt_logprobs: false` is a request's explicit no: it was dropped (None = the run's
    setting), so under a run with --prompt-logprobs the request got them anyway."""
    def setting(value):
        row, err = request_row({"custom_id": "a", "url": "/v1/completions",
                                "body": {"prompt": "x", "prompt_logprobs": value}}, "id", "prompt")
        assert err is None
        return row.get("prompt_logprobs", "the run's")

    assert setting(False) is False and setting(True) is True and setting(0) is True
    assert setting(None) == "the run's"
