"""The score task: `Engine.score` (text log-likelihood, perplexity) against transformers' loss,
rolling windows against lm-evaluation-harness's window rule computed with transformers,
conditional scoring (`score_after`) against transformers on prefix + continuation, per-row
errors, the stage on a hand-built batch, and one pipeline run end to end."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from pipeline_fixtures import PROMPTS, assert_exactly_once, read_output, tiny_model, write_shards
from tolerances import accumulation_tol, forward_terms

from model import Engine

TEXTS = ["the cat reads a long letter before lunch.", "Explain why the sky is blue.",
         "I loved this film, the acting was wonderful.", "ok"]


def close(ours: float, expected: float, config, keys: int, terms: int) -> bool:
    """fp32 tolerance for a log-likelihood summed over `terms` scored tokens of rows of up to
    `keys` positions: the forward's accumulations, the head's logsumexp over the vocabulary, and
    the sum over tokens (tests/tolerances.py)."""
    n = forward_terms(config, keys) + config.vocab_size + terms
    return abs(ours - expected) <= accumulation_tol(torch.float32, n, abs(expected))


@torch.no_grad()
def hf_token_logprobs(hf, ids: list[int]) -> list[float]:
    """log p(ids[j] | ids[:j]) for j >= 1, from one transformers forward over `ids`."""
    logp = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [logp[j - 1, t].item() for j, t in enumerate(ids) if j >= 1]


def test_score_equals_transformers_loss(lm, hf_lm, tokenizer):
    engine = Engine(lm, tokenizer, max_batch_size=4, max_seq_len=64)
    results = engine.score(TEXTS)
    for text, res in zip(TEXTS, results):
        ids = tokenizer.encode(text, add_bos=True)
        with torch.no_grad():
            loss = hf_lm(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()  # mean NLL of ids[1:]
        n = len(ids) - 1
        assert res.error is None and res.num_tokens == n
        assert close(res.mean_logprob, -loss, lm.config, len(ids), n)
        assert close(res.logprob, -loss * n, lm.config, len(ids), n)
        assert res.perplexity == pytest.approx(math.exp(-res.mean_logprob), rel=1e-12)
        assert res.perplexity == pytest.approx(math.exp(loss), rel=1e-4)
    # token-id texts are scored as given; without BOS the first token is context only
    ids = tokenizer.encode(TEXTS[0], add_bos=False)
    plain = engine.score([ids], add_bos=False)[0]
    assert plain.num_tokens == len(ids) - 1
    assert close(plain.logprob, sum(hf_token_logprobs(hf_lm, ids)), lm.config, len(ids), len(ids))


def lm_eval_rolling_windows(token_list, prefix_token, max_seq_len, context_len):
    """lm-evaluation-harness's get_rolling_token_windows + make_disjoint_window (lm_eval/utils.py),
    transcribed: (context tokens, continuation tokens) pairs that score every token once."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    windows = [([prefix_token] + token_list[:first_seq_len - 1], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        windows.append((token_list[window_end - max_seq_len - 1:window_end - 1],
                        token_list[window_end - window_pred_len:window_end]))
        predicted += window_pred_len
    return [(a[:len(a) - (len(b) - 1)], b) for a, b in windows]  # make_disjoint_window


@pytest.mark.parametrize("stride", [None, 512, 100])
def test_rolling_windows_equal_a_manual_rolling_computation(lm, hf_lm, tokenizer, stride):
    limit = lm.config.max_position_embeddings  # 512
    text = " ".join(PROMPTS * 40)  # ~1500 tokens, three to four windows
    ids = tokenizer.encode(text, add_bos=True)
    assert len(ids) > 2 * limit
    engine = Engine(lm, tokenizer, max_batch_size=4)
    res, short = engine.score([text, TEXTS[1]], stride=stride)
    step = limit // 2 if stride is None else stride
    expected, scored = 0.0, 0
    for context, cont in lm_eval_rolling_windows(ids[1:], ids[0], limit, limit - step + 1):
        window = context + cont[:-1]  # what the model reads: at most max_position_embeddings tokens
        assert len(window) <= limit
        logps = hf_token_logprobs(hf_lm, context + cont)
        expected += sum(logps[-len(cont):])
        scored += len(cont)
    assert scored == res.num_tokens == len(ids) - 1  # every token once
    assert close(res.logprob, expected, lm.config, limit, scored)
    assert short.error is None and short.num_tokens == len(tokenizer.encode(TEXTS[1])) - 1
    # without rolling the long text is its row's error, its neighbour scored as before
    res, again = engine.score([text, TEXTS[1]], rolling=False)
    assert res.error_kind == "prompt_too_long" and "rolling" in res.error and res.logprob is None
    assert close(again.logprob, short.logprob, lm.config, 64, short.num_tokens)  # (cached blocks: other rounding)


def test_score_after_equals_transformers_on_prefix_and_continuation(lm, hf_lm, tokenizer):
    engine = Engine(lm, tokenizer, max_batch_size=8, max_seq_len=128)
    prefix = "Question: why is the sky blue? Answer:"
    answers = [" because of scattering.", " the cat reads a letter.", " because of scattering. "]
    results = engine.score(answers, score_after=prefix + " ")  # trailing space moves to the text
    context = tokenizer.encode(prefix, add_bos=True)
    for answer, res in zip(answers, results):
        cont = tokenizer.encode(prefix + " " + answer, add_bos=True)[len(context):]
        logps = hf_token_logprobs(hf_lm, context + cont)
        assert res.num_tokens == len(cont)
        assert close(res.logprob, sum(logps[-len(cont):]), lm.config, len(context + cont), len(cont))
    assert engine.stats()["prefix_cache_hit_tokens"] > 0  # the rows shared the prefix's blocks
    # one prefix per row (None = unconditional), as a column gives them
    mixed = engine.score([answers[0], TEXTS[0]], score_after=[prefix + " ", None])
    assert close(mixed[0].logprob, results[0].logprob, lm.config, 64, mixed[0].num_tokens)
    alone = engine.score([TEXTS[0]])[0]
    assert close(mixed[1].logprob, alone.logprob, lm.config, 64, alone.num_tokens)


def test_bad_rows_get_errors_and_neighbours_are_scored(lm, tokenizer):
    engine = Engine(lm, tokenizer, max_batch_size=4, max_seq_len=64)
    good = engine.score([TEXTS[0]])[0]
    out = engine.score(["", "   ", TEXTS[0], 42, "x " * 200], rolling=False)
    assert [r.error_kind for r in out] == ["empty_prompt", "empty_prompt", None, "invalid_prompt", "prompt_too_long"]
    assert close(out[2].logprob, good.logprob, lm.config, 64, good.num_tokens)
    assert engine.score(["   "], score_after="Q:")[0].error_kind == "empty_prompt"
    with pytest.raises(ValueError, match="stride"):
        engine.score(TEXTS, stride=0)
    with pytest.raises(ValueError, match="prefixes"):
        engine.score(TEXTS, score_after=["a"])


# ---- the pipeline -------------------------------------------------------------------------------
def score_config(**kw):
    from pipeline import PipelineConfig

    return PipelineConfig(**{"task": "score", "input": "in/", "output": "out/", "model": tiny_model("causal"), **kw})


def test_score_stage_on_a_hand_built_batch():
    from pipeline import ConfigError, ScoreStage

    engine = Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, dtype="float32", device="cpu")
    stage = ScoreStage(score_config(score_after="question"), engine=engine)
    batch = {"id": [1, 2, 3, 4, 5], "prompt": [" blue light.", "", " blue light.", " blue light.", None],
             "question": ["Why is the sky blue?", "Q", None, 7, "Q"]}
    out = stage(batch).to_pylist()
    assert [r["id"] for r in out] == [1, 2, 3, 4, 5]
    assert [r["error_kind"] for r in out] == [None, "empty_prompt", None, "invalid_prefix", "invalid_prompt"]
    direct = engine.score([" blue light.", " blue light."], score_after=["Why is the sky blue?", None])
    for row, res in zip((out[0], out[2]), direct):
        assert row["num_tokens"] == res.num_tokens and row["logprob"] == pytest.approx(res.logprob, abs=1e-4)
        assert row["perplexity"] == pytest.approx(math.exp(-row["mean_logprob"]), rel=1e-12)
    assert stage(pa.table({"id": [1], "prompt": ["x y z"]})).schema.field("num_tokens").type == pa.int64()
    # a --score-after that names no column of the batch is the prefix text itself
    literal = ScoreStage(score_config(score_after="Why is the sky blue?"), engine=engine)({"id": [1], "prompt": [" blue light."]})
    assert literal["logprob"].to_pylist()[0] == pytest.approx(out[0]["logprob"], abs=1e-4)
    with pytest.raises(ConfigError, match="score_stride"):
        score_config(score_stride=10, score_rolling=False).validate()
    with pytest.raises(ConfigError, match="score_after"):
        score_config(score_after="prompt").validate()
    with pytest.raises(ConfigError, match="score_after: applies to the score task only"):
        score_config(score_after="x").__class__(task="label", input="i", output="o", model="m", choices=["a", "b"],
                                               score_after="x").validate()


@pytest.mark.ray
def test_score_end_to_end_via_cli_every_row_once(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.cli import main

    inputs = tmp_path / "in"
    write_shards(str(inputs), shards=2, rows=4)
    long_text = " ".join(PROMPTS * 30)  # past the tiny model's 512 positions: scored in windows
    bad = pa.table({"id": pa.array([100, 101, 102, 103], pa.int64()), "prompt": ["fine text", None, "  ", long_text],
                    "meta": list("abcd")})
    pq.write_table(bad, str(inputs / "part-00009.parquet"))
    out = str(tmp_path / "out")
    assert main(["score", "--input", str(inputs), "--output", out, "--model", tiny_model("causal"), "--replicas", "1",
                 "--batch-size", "3", "--keep-columns", "meta", "--quiet"]) == 0
    table = read_output(out).sort_by("id")
    ids_in = [i for s in range(2) for i in range(s * 4, s * 4 + 4)] + [100, 101, 102, 103]
    assert_exactly_once(table["id"].to_pylist(), ids_in)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert {i: rows[i]["error_kind"] for i in (101, 102)} == {101: "invalid_prompt", 102: "empty_prompt"}
    engine = Engine.from_pretrained(tiny_model("causal"), max_batch_size=4, dtype="float32", device="cpu")
    prompts = [r["prompt"] for r in pq.read_table(str(inputs / "part-00000.parquet")).to_pylist()]
    for i, res in enumerate(engine.score(prompts + ["fine text", long_text])):
        row = rows[[0, 1, 2, 3, 100, 103][i]]
        assert row["error"] is None and row["num_tokens"] == res.num_tokens
        assert close(row["logprob"], res.logprob, engine.config, 512, res.num_tokens)
    assert rows[103]["num_tokens"] > 512



def test_plan_warns_when_score_after_is_a_column_in_only_some_files(tmp_path):
    """--score-after NAME is a column where a file has it and literal prefix text elsewhere; a
    column in some files but not others is flagged by plan (summary line and --json)."""
    import pyarrow.parquet as pq

    from pipeline.plan import describe, make_plan, summary_lines

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1], "prompt": [" blue."], "question": ["Why?"]}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "b.jsonl").write_text('{"id": 2, "prompt": " red."}\n')
    config = score_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), score_after="question")
    plan = make_plan(config.validate(), write=False)
    assert len(plan.warnings) == 1 and "column in 1 of 2 input files" in plan.warnings[0]
    assert "b.jsonl" in plan.warnings[0]
    d = describe(config, plan)
    assert d["warnings"] == plan.warnings and any(line.startswith("! --score-after") for line in summary_lines(d))
    # everywhere a column, or nowhere (a literal prefix): nothing to say
    (tmp_path / "in" / "b.jsonl").write_text('{"id": 2, "prompt": " red.", "question": "Why?"}\n')
    assert make_plan(config, write=False).warnings == []
    literal = score_config(input=str(tmp_path / "in"), output=str(tmp_path / "out"), score_after="Q: ")
    assert make_plan(literal.validate(), write=False).warnings == []
