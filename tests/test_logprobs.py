"""Token log-probabilities (SamplingParams.logprobs / prompt_logprobs) against transformers'
PersimmonForCausalLM on the tiny random model: the sampled token's raw log-probability, its top
alternatives, the prompt's log-probabilities (also through chunked prefill, the prefix cache and
preemption), and that asking for them changes no token."""

import pytest
import torch
from conftest import LIVELY, hf_twin, prompts_of, random_model

from model import Engine, PersimmonConfig, PersimmonForCausalLM, SamplingParams
from model.logprobs import LOGPROB_ROWS, sampled_logprobs
from tolerances import approx_forward

def hf_logp(hf_lm, tokens) -> torch.Tensor:
    """transformers' log_softmax over the vocabulary at every position of `tokens` [T, V]."""
    with torch.no_grad():
        return hf_lm(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def check_generated(hf_lm, config, prompt, out, top_n):
    """Each generated token's logprob and top-N equal transformers' log_softmax there."""
    logp = hf_logp(hf_lm, prompt + out.token_ids)
    keys = len(prompt) + len(out.token_ids)
    assert [t.token_id for t in out.logprobs] == out.token_ids
    for j, t in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + j]
        assert t.logprob == approx_forward(row[t.token_id].item(), config, keys=keys)
        assert len(t.top) == top_n
        values = [a.logprob for a in t.top]
        assert values == sorted(values, reverse=True)
        assert values == approx_forward(row.topk(top_n).values.tolist(), config, keys=keys)  # the N largest
        assert values == approx_forward([row[a.token_id].item() for a in t.top], config, keys=keys)


def test_generated_logprobs_and_top_n_match_transformers(lm, hf_lm):
    prompts = prompts_of([7, 13, 4])
    engine = Engine(lm, None, max_batch_size=4, max_seq_len=48)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=5))
    for p, o in zip(prompts, outs):
        check_generated(hf_lm, lm.config, p, o, 5)
        assert o.prompt_logprobs is None
    # logprobs=0: the token's own log-probability, no alternatives
    zero = engine.generate(prompts[:1], SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=0))[0]
    assert all(t.top == [] for t in zero.logprobs)
    assert engine.generate(prompts[:1], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].logprobs is None


def test_greedy_tokens_unchanged_and_mixed_rows(lm):
    prompts = prompts_of([9, 5, 17, 11], seed=1)
    engine = Engine(lm, None, max_batch_size=4, max_seq_len=48)
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    mixed = [SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=20, prompt_logprobs=True),
             SamplingParams(max_new_tokens=8, ignore_eos=True),
             SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=True),
             SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2)]
    outs = engine.generate(prompts, mixed)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert [o.logprobs is None for o in outs] == [False, True, True, False]
    assert [o.prompt_logprobs is None for o in outs] == [False, True, False, True]
    assert [len(outs[0].logprobs[0].top), len(outs[3].logprobs[0].top)] == [20, 2]


def test_sampled_rows_report_the_raw_logprob(lm, hf_lm):
    """temperature / top-k / top-p change which token is drawn, not the log-probability reported
    for it: log_softmax of the model's own logits (vLLM's default, "raw_logprobs")."""
    prompt = prompts_of([10], seed=2)[0]
    p = SamplingParams(max_new_tokens=8, temperature=1.7, top_p=0.8, top_k=40, seed=11, ignore_eos=True, logprobs=3)
    out = Engine(lm, None, max_batch_size=2, max_seq_len=48).generate([prompt], p)[0]
    check_generated(hf_lm, lm.config, prompt, out, 3)
    logp = hf_logp(hf_lm, prompt + out.token_ids)
    tempered = [(logp[len(prompt) - 1 + j] / 1.7).log_softmax(-1)[t].item() for j, t in enumerate(out.token_ids)]
    assert max(abs(t.logprob - x) for t, x in zip(out.logprobs, tempered)) > 0.05  # not the tempered one
    # the same seed without logprobs draws the same tokens
    again = Engine(lm, None, max_batch_size=2, max_seq_len=48).generate(
        [prompt], SamplingParams(max_new_tokens=8, temperature=1.7, top_p=0.8, top_k=40, seed=11, ignore_eos=True))
    assert again[0].token_ids == out.token_ids


def check_prompt_logprobs(hf_lm, config, prompt, out):
    logp = hf_logp(hf_lm, prompt)
    expected = [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    got = out.prompt_logprobs
    assert [t.token_id for t in got] == prompt and got[0].logprob is None
    assert [t.logprob for t in got[1:]] == approx_forward(expected, config, keys=len(prompt))


@pytest.mark.parametrize("budget", [4096, 5])  # whole prompts, and prefilled in chunks of 5 tokens
def test_prompt_logprobs_match_transformers_shifted(lm, hf_lm, budget):
    prompts = prompts_of([1, 2, 12, 23], seed=3)
    engine = Engine(lm, None, max_batch_size=4, max_seq_len=48, prefill_token_budget=budget)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True, prompt_logprobs=True))
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True))
    for p, o, q in zip(prompts, outs, plain):
        check_prompt_logprobs(hf_lm, lm.config, p, o)
        assert o.token_ids == q.token_ids


def test_prompt_logprobs_skip_the_prefix_cache(lm, hf_lm):
    """A cached block has keys but no hidden states: a row asking for prompt log-probabilities
    computes its whole prompt (no hits), other rows still share the cached blocks, and a row
    recomputed after preemption keeps what it had."""
    shared = prompts_of([16], seed=4)[0]
    prompts = [shared + tail for tail in prompts_of([3, 5], seed=5)]
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=48, kv_block_size=4)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # caches the shared blocks
    hits = engine.stats()["prefix_cache_hit_tokens"]
    out = engine.generate(prompts[1:], SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=True))[0]
    assert engine.stats()["prefix_cache_hit_tokens"] == hits  # none: the whole prompt was computed
    check_prompt_logprobs(hf_lm, lm.config, prompts[1], out)
    engine.generate(prompts[1:], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert engine.stats()["prefix_cache_hit_tokens"] > hits  # without them the cache serves the row


def test_logprobs_survive_preemption(lm, hf_lm):
    prompts = prompts_of([10, 12, 9, 11], seed=6)
    p = SamplingParams(max_new_tokens=14, ignore_eos=True, logprobs=2, prompt_logprobs=True)
    # 11 blocks of 4 tokens cannot hold four rows growing to 26 tokens: rows are preempted, recomputed
    per_token = 2 * lm.config.num_hidden_layers * lm.config.hidden_size * 4
    small = Engine(lm, None, max_batch_size=4, max_seq_len=48, kv_block_size=4,
                   kv_cache_gib=(11 + 2) * 4 * per_token / 2**30)
    outs = small.generate(prompts, p)
    assert small.stats()["preemptions"] > 0
    roomy = Engine(lm, None, max_batch_size=4, max_seq_len=48).generate(prompts, p)
    for prompt, o, r in zip(prompts, outs, roomy):
        assert o.token_ids == r.token_ids
        assert len(o.logprobs) == len(o.token_ids) and len(o.prompt_logprobs) == len(prompt)
        check_generated(hf_lm, lm.config, prompt, o, 2)
        check_prompt_logprobs(hf_lm, lm.config, prompt, o)


def test_sampled_logprobs_in_chunks_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(LOGPROB_ROWS * 2 + 3, 50, generator=g)
    rows = list(range(0, logits.shape[0], 1))
    tokens = torch.randint(0, 50, (len(rows),), generator=g).tolist()
    top_n = [i % 4 for i in rows]
    found = sampled_logprobs(logits, rows, tokens, top_n)
    lp = logits.log_softmax(-1)
    for i, (value, ids, values) in enumerate(found):
        assert value == pytest.approx(lp[i, tokens[i]].item(), abs=1e-6)
        assert ids == lp[i].topk(top_n[i]).indices.tolist() if top_n[i] else ids == []
        assert values == pytest.approx(lp[i, ids].tolist(), abs=1e-6)


@pytest.mark.parametrize("name,value", [("logprobs", 21), ("logprobs", -1), ("logprobs", True), ("logprobs", 2.0),
                                        ("prompt_logprobs", 1), ("prompt_logprobs", None)])
def test_bad_settings_are_refused(name, value):
    with pytest.raises(ValueError, match=f"^{name}: (must be|expected)"):
        SamplingParams(**{name: value})


def test_token_text_names_each_token(tokenizer):
    tok = tokenizer
    ids = tok.encode("the cat reads é", add_bos=True)
    texts = [tok.token_text(i) for i in ids]
    assert texts[0] == "|ENDOFTEXT|"
    assert "".join(texts[1:]).startswith(" the cat")  # pieces with their spaces
    byte = tok.token_to_id("<0xC3>")
    assert tok.token_text(byte) == "bytes:\\xc3" and tok.token_text(tok.token_to_id("<0x41>")) == "A"
    assert tok.token_text(10**6) == ""


def test_structured_rows_report_the_unmasked_logprob(tokenizer):
    """A grammar decides which tokens may be drawn; the reported log-probability is still the
    model's own (documented: vLLM reports it after the grammar mask)."""
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64)
    out = engine.generate(["Review: lovely"], SamplingParams(max_new_tokens=6, choice=["yes", "no"], logprobs=1))[0]
    ids = tokenizer.encode("Review: lovely")
    logp = hf_logp(hf_twin(model), ids + out.token_ids)
    assert [t.logprob for t in out.logprobs] == approx_forward(
        [logp[len(ids) - 1 + j, t].item() for j, t in enumerate(out.token_ids)], model.config, keys=len(ids) + 6)
    assert out.logprobs[0].token == tokenizer.token_text(out.token_ids[0])
