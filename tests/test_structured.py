"""Structured generation on the tiny random model: random weights put no probability on valid
structure, so every finished row matching its JSON schema, regex or choice list is the
constraint's doing. Plus mid-sequence tokenization and the pipeline's `parsed` column."""

import json
import re

import jsonschema
import pytest
from conftest import random_model

from model import Engine, PersimmonConfig, PersimmonForCausalLM, SamplingParams
from model.structured import check_grammar

SCHEMA = {"type": "object",
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "topics": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
                         "score": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["sentiment", "topics", "score"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tokenizer):
    lm = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(initializer_range=0.3, vocab_size=512))
    return Engine(lm, tokenizer, max_batch_size=16, max_seq_len=400, kv_block_size=4)


PROMPTS = ["Review: lovely film", "Review: dull", "hello there", "a b c", "The cat sat.", "x", "Numbers 1 2 3",
           "Q: what? A:"]


def test_encode_fragment_is_mid_sequence_tokenization(tokenizer):
    for text in ["-", "abc", " abc", "  two  spaces ", "x\n\ny", "€uro", '{"a": 1}', " "]:
        ids = tokenizer.encode_fragment(text)
        assert tokenizer._fragment_sp.decode(ids) == text  # exactly the text: no dummy space, no clean-up
        assert tokenizer.encode_fragment("") == []
    # the plain encoder does add sentencepiece's dummy-prefix space (why the fragment one exists)
    assert tokenizer.encode("-", add_bos=False) != tokenizer.encode_fragment("-")


def test_json_schema_rows_match_their_schema(engine):
    unconstrained = engine.generate(PROMPTS, SamplingParams(max_new_tokens=40, temperature=1.0, seed=3))
    assert not any(_is_json(o.text) for o in unconstrained)  # the model alone writes no JSON
    params = [SamplingParams(max_new_tokens=120, temperature=1.0, seed=s, json_schema=SCHEMA) for s in range(len(PROMPTS))]
    outs = engine.generate(PROMPTS, params)
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= len(PROMPTS) // 2, [(o.finish_reason, o.text, o.error) for o in outs]
    for o in finished:
        jsonschema.validate(json.loads(o.text), SCHEMA)
    for o in outs:
        assert o.error is None and o.finish_reason in ("stop", "length")
    # greedy, and a budget too small to finish: "length", text a prefix of a valid document
    cut = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3, json_schema=SCHEMA))
    assert all(o.finish_reason == "length" and o.text.startswith('{"') for o in cut)


def test_regex_and_choice_rows(engine):
    pattern = r"[0-9]{3}-[a-z]{2,4}( ok)?"
    outs = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=30, temperature=1.0, seed=s, regex=pattern)
                                     for s in range(len(PROMPTS))])
    assert all(o.finish_reason == "stop" and re.fullmatch(pattern, o.text) for o in outs), [o.text for o in outs]
    choices = ["yes please", "no thanks", "maybe later on"]
    outs = engine.generate(PROMPTS, [SamplingParams(max_new_tokens=30, temperature=1.0, seed=s, choice=choices)
                                     for s in range(len(PROMPTS))])
    assert all(o.finish_reason == "stop" and o.text in choices for o in outs)
    assert len({o.text for o in outs}) > 1  # sampling still chooses among the allowed


def test_constrained_rows_mix_with_free_rows_and_preemption(tokenizer):
    lm = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(initializer_range=0.3, vocab_size=512))
    per_token = 2 * lm.config.num_hidden_layers * lm.config.hidden_size * 4
    tight = Engine(lm, tokenizer, max_batch_size=8, max_seq_len=200, kv_block_size=4,
                   kv_cache_gib=(40 + 2) * 4 * per_token / 2**30)
    roomy = Engine(lm, tokenizer, max_batch_size=8, max_seq_len=200, kv_block_size=4)
    params = [SamplingParams(max_new_tokens=60, temperature=1.0, seed=s, json_schema=SCHEMA if s % 2 else None,
                             ignore_eos=s % 2 == 0) for s in range(8)]
    a, b = tight.generate(PROMPTS, params), roomy.generate(PROMPTS, params)
    assert tight.stats()["preemptions"] > 0
    assert [o.token_ids for o in a] == [o.token_ids for o in b]  # grammar state survives recompute
    for o, p in zip(a, params):
        if p.json_schema and o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), SCHEMA)


def test_bad_grammars_are_per_row_errors(engine):
    outs = engine.generate(["a", "b"], [SamplingParams(max_new_tokens=5, regex="[0-9"),
                                        SamplingParams(max_new_tokens=5, regex="[0-9]{2}")])
    assert outs[0].finish_reason == "error" and "invalid grammar" in outs[0].error
    assert outs[1].finish_reason == "stop" and outs[1].text.isdigit()
    assert check_grammar(regex="[0-9")
    assert check_grammar(json_schema={"type": "objectx"})
    assert check_grammar(json_schema=SCHEMA) == ""
    with pytest.raises(ValueError, match="one of json_schema, regex, choice"):
        SamplingParams(regex="a", choice=["a"])


def test_pipeline_generate_with_a_schema_file_fills_parsed(tmp_path):
    from pipeline_fixtures import PROMPTS as ROWS
    from pipeline_fixtures import tiny_model

    from pipeline import PipelineConfig
    from pipeline.attachments import load_attachments
    from pipeline.settings import ConfigError
    from pipeline.stages import GenerateStage

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    base = dict(task="generate", input="in", output="out", model=tiny_model("causal"), max_new_tokens=120,
                temperature=1.0, seed=5)
    config = load_attachments(PipelineConfig(**base, json_schema=str(schema_file)).validate())
    assert config.json_schema == SCHEMA
    stage = GenerateStage(config, engine=Engine.from_pretrained(tiny_model("causal"), device="cpu"))
    rows = stage({"id": list(range(6)), "prompt": ROWS[:6]}).to_pylist()
    assert any(r["finish_reason"] == "stop" for r in rows)
    for r in rows:
        if r["finish_reason"] == "stop":
            assert json.loads(r["parsed"]) == json.loads(r["completion"])
            jsonschema.validate(json.loads(r["parsed"]), SCHEMA)
        else:
            assert r["parsed"] is None
    with pytest.raises(ConfigError, match="json_schema: .*Invalid type"):
        schema_file.write_text('{"type": "objectx"}')
        load_attachments(PipelineConfig(**base, json_schema=str(schema_file)).validate())
    with pytest.raises(ConfigError, match="(?s)regex: .*unclosed"):
        load_attachments(PipelineConfig(**base, regex="[0-9").validate())
    with pytest.raises(ConfigError, match="one of"):
        PipelineConfig(**base, regex="a+", choices=["x", "y"]).validate()
    with pytest.raises(ConfigError, match="generate task only"):
        PipelineConfig(**{**base, "task": "label"}, choices=["x", "y"], regex="a+").validate()


def _is_json(text):
    try:
        json.loads(text)
        return text.strip().startswith(("{", "["))
    except ValueError:
        return False
