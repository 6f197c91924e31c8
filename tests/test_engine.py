"""Engine vs transformers: greedy tokens, generate tensors, scoring, classification, sampling,
stop conditions, continuous batching over the paged KV cache, preemption and per-row errors."""

import pytest
import torch
from conftest import LIVELY, hf_twin, prompts_of, random_model
from hf_compat import generate_tensor

from model import (
    Engine,
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    SamplingParams,
)
from model import cpu_kernels
from model.cpu_packing import cpu_packing_unsupported
from model.model_runner import ModelRunner
from tolerances import accumulation_tol, approx_forward, assert_forward_close, forward_tol, no_less_precise

def tiny_pool(blocks: int, block_size: int, config=None) -> float:
    """kv_cache_gib for a pool of exactly `blocks` blocks of the tiny model (2 reserved)."""
    config = config or PersimmonConfig.tiny()
    per_token = 2 * config.num_hidden_layers * config.hidden_size * 4
    return (blocks + 2) * block_size * per_token / 2**30


@pytest.fixture(params=["cpu-kernel", "gather-sdpa"])
def attention_path(request, monkeypatch):
    """Run a test on both CPU attention paths: the native kernel and gather + SDPA."""
    if request.param == "gather-sdpa":
        monkeypatch.setattr(cpu_kernels, "available", lambda dtype: False)
    elif not cpu_kernels.available(torch.float32):
        pytest.skip("the CPU kernel could not be built here (no C compiler); the gather path is tested")
    return request.param


def hf_greedy(hf, prompt, new, eos=None):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("block_size", [16, 4, 1])
def test_greedy_tokens_identical_to_transformers_across_row_refills(lm, hf_lm, block_size, attention_path):
    # 9 prompts of mixed lengths through 3 rows in flight: rows finish and are replaced many times
    prompts = prompts_of([5, 31, 2, 17, 9, 40, 3, 12, 25])
    news = [24, 7, 30, 12, 18, 5, 26, 9, 14]
    engine = Engine(lm, None, max_batch_size=3, max_seq_len=80, kv_block_size=block_size)
    assert engine.stats()["attention_backend"] == ("cpu_kernel" if attention_path == "cpu-kernel" else "torch")
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    outs = engine.generate(prompts, params)
    assert len({tuple(o.token_ids) for o in outs}) > 5  # the model emits varied outputs
    for p, n, o in zip(prompts, news, outs):
        assert o.token_ids == hf_greedy(hf_lm, p, n)
        assert o.finish_reason == "length" and o.num_generated_tokens == n
        assert o.num_prompt_tokens == len(p)
    assert engine.stats()["rows_in_flight_peak"] == 3


def test_greedy_output_independent_of_batch_and_slot(lm):
    prompts = prompts_of([6, 19, 11, 27, 4, 14])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    together = Engine(lm, None, max_batch_size=6, max_seq_len=64).generate(prompts, params)
    one_slot = Engine(lm, None, max_batch_size=1, max_seq_len=64, kv_block_size=4).generate(prompts, params)
    reversed_ = Engine(lm, None, max_batch_size=4, max_seq_len=64).generate(prompts[::-1], params)[::-1]
    for a, b, c in zip(together, one_slot, reversed_):
        assert a.token_ids == b.token_ids == c.token_ids


def test_model_generate_equals_transformers_tensor(lm, hf_lm):
    prompts = prompts_of([4, 9, 7])
    T = 9
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    ref_free = hf_lm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    # pick an eos that some row emits mid-way, so early stop and padding are exercised
    eos = ref_free[1, T + 3].item()
    ref = hf_lm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    ours = generate_tensor(lm, ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref)
    assert torch.equal(generate_tensor(lm, ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                                       eos_token_id=[]), ref_free)


def test_shared_prefix_is_prefilled_once_and_reused_across_calls(lm, hf_lm, attention_path):
    shared = prompts_of([24], seed=5)[0]
    prompts = [shared + p for p in prompts_of([3, 6, 2, 5], seed=6)]
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=64, kv_block_size=4)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    # the 24 shared tokens (6 full blocks) are computed once, not once per row, even though all
    # rows arrive together: rows sharing a block being computed wait one step and reuse it
    stats = engine.stats()
    assert stats["prefill_tokens"] == 24 + sum(len(p) - 24 for p in prompts)
    assert stats["prefix_cache_hit_tokens"] == 24 * (len(prompts) - 1)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf_lm, p, 8)
    # a second call finds every full block of its prompts cached: only the tails are computed
    again = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    tails = sum(len(p) - (len(p) - 1) // 4 * 4 for p in prompts)
    assert engine.stats()["prefill_tokens"] - stats["prefill_tokens"] == tails
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    # prefix caching off: every row computes its whole prompt
    off = Engine(lm, None, max_batch_size=2, max_seq_len=64, kv_block_size=4, prefix_caching=False)
    assert [o.token_ids for o in off.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))] == \
        [o.token_ids for o in outs]
    assert off.stats()["prefill_tokens"] == sum(len(p) for p in prompts)


def test_logprobs_match_transformers_scores(lm, hf_lm):
    prompt = prompts_of([7])[0]
    out = Engine(lm, None, max_batch_size=2, max_seq_len=32).generate(
        [prompt], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=0))[0]
    ref = hf_lm.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    expected = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(ref.logits, out.token_ids)]
    assert [t.logprob for t in out.logprobs] == approx_forward(expected, lm.config, keys=len(prompt) + 5)


def test_seeded_sampling_reproducible_across_batch_compositions(lm):
    prompts = prompts_of([5, 12, 8])
    p = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    alone = Engine(lm, None, max_batch_size=1, max_seq_len=48).generate(prompts[1:2], p)[0]
    mixed = Engine(lm, None, max_batch_size=3, max_seq_len=48).generate(
        [prompts[0], prompts[1], prompts[2]],
        [SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True), p,
         SamplingParams(max_new_tokens=3, ignore_eos=True)])[1]
    assert alone.token_ids == mixed.token_ids
    other_seed = Engine(lm, None, max_batch_size=1, max_seq_len=48).generate(
        prompts[1:2], SamplingParams(max_new_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=99,
                                     ignore_eos=True))[0]
    greedy = Engine(lm, None, max_batch_size=1, max_seq_len=48).generate(
        prompts[1:2], SamplingParams(max_new_tokens=10, ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids or alone.token_ids != greedy.token_ids


def test_top_k_one_equals_greedy(lm):
    prompts = prompts_of([5, 12])
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=48)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=10, ignore_eos=True))
    topk1 = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1, seed=3,
                                                    ignore_eos=True))
    assert [g.token_ids for g in greedy] == [t.token_ids for t in topk1]


def test_stop_token_ids_and_max_new_tokens(lm, hf_lm):
    prompt = prompts_of([6])[0]
    free = hf_greedy(hf_lm, prompt, 12)
    stop_at = 4
    stop_id = free[stop_at]
    first = free.index(stop_id)
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=48)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[:first + 1]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.token_ids == free[:3]


def test_eos_from_config_stops_unless_ignored(lm, hf_lm):
    prompt = prompts_of([6])[0]
    free = hf_greedy(hf_lm, prompt, 12)
    cfg = PersimmonConfig.tiny(**LIVELY, eos_token_id=free[5])
    model = PersimmonForCausalLM(cfg).eval()
    model.load_state_dict(lm.state_dict())
    engine = Engine(model, None, max_batch_size=1, max_seq_len=48)
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == free[5]
    assert len(stopped.token_ids) == free.index(free[5]) + 1
    assert engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))[0].token_ids == free


def test_stop_strings_trim_text(lm, tokenizer):
    engine = Engine(lm, tokenizer, max_batch_size=2, max_seq_len=64)
    full = engine.generate(["The cat reads a book."], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:5]
    out = engine.generate(["The cat reads a book."], SamplingParams(max_new_tokens=20, ignore_eos=True,
                                                                    stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(stop)]
    assert stop not in out.text
    assert out.token_ids == full.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) < len(full.token_ids)


def test_a_stop_token_ends_the_row_but_its_text_is_not_in_the_completion(lm, tokenizer):
    """The stop token is the last of token_ids, but the text is what the tokens before it decode to."""
    engine = Engine(lm, tokenizer, max_batch_size=2, max_seq_len=64)
    prompt = "The cat reads a book."
    full = engine.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    ids = full.token_ids
    text = [tokenizer.decode(ids[:n], skip_special_tokens=True) for n in range(len(ids) + 1)]
    # a token that first appears after the start and adds visible text of its own
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k] and text[k + 1].startswith(text[k])
             and text[k + 1][len(text[k]):].strip() and "\ufffd" not in text[k + 1][len(text[k]):])
    out = engine.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True, stop_token_ids=[ids[k]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[:k + 1]
    assert out.text == text[k] and out.text != text[k + 1]


def test_bad_rows_get_errors_and_neighbours_unaffected(lm, tokenizer):
    engine = Engine(lm, tokenizer, max_batch_size=2, max_seq_len=24)
    good = ["The cat reads.", "A dog runs home."]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = engine.generate(good, params)
    long_prompt = "word " * 80
    mixed = engine.generate(["", good[0], "   ", long_prompt, [], good[1], [9999]], params)
    assert [m.finish_reason for m in mixed] == ["error", "length", "error", "error", "error", "length", "error"]
    assert "empty" in mixed[0].error and "empty" in mixed[2].error
    assert "max_seq_len" in mixed[3].error and "truncate" in mixed[3].error
    assert "vocabulary" in mixed[6].error
    assert [m.error_kind for m in mixed] == ["empty_prompt", None, "empty_prompt", "prompt_too_long", "empty_prompt",
                                             None, "invalid_prompt"]
    assert mixed[1].token_ids == alone[0].token_ids and mixed[5].token_ids == alone[1].token_ids
    assert mixed[1].error is None
    truncated = engine.generate([long_prompt], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                              truncate="left"))[0]
    assert truncated.finish_reason == "length" and truncated.num_prompt_tokens == 24 - 6


def hf_choice_scores(hf_lm, tokenizer, prompt, choices, separator=" "):
    """(sum, token count) of each choice's continuation tokens: one full transformers forward
    over prompt + separator + choice, scored after the prompt's own tokens."""
    p_ids = tokenizer.encode(prompt)
    out = []
    for choice in choices:
        whole = tokenizer.encode(prompt + separator + choice)
        assert whole[:len(p_ids)] == p_ids  # these prompts end where a token ends
        cont = whole[len(p_ids):]
        with torch.no_grad():
            logp = hf_lm(torch.tensor([whole])).logits[0].float().log_softmax(-1)
        out.append((sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(cont)), len(cont)))
    return out


def test_score_choices_equals_transformers_log_softmax(lm, hf_lm, tokenizer):
    engine = Engine(lm, tokenizer, max_batch_size=4, max_seq_len=64)
    prompts = ["Review: the film was lovely. Sentiment:", "Review: dull and slow. Sentiment:"]
    choices = ["positive", "negative", "not sure at all"]
    results = engine.score_choices(prompts, choices)
    means = engine.score_choices(prompts, choices, normalize="mean")
    for prompt, res, mean in zip(prompts, results, means):
        expected = hf_choice_scores(hf_lm, tokenizer, prompt, choices)
        assert res.scores == approx_forward([s for s, _ in expected], lm.config, keys=64)
        assert res.num_tokens == [n for _, n in expected]
        assert res.label == choices[max(range(3), key=lambda k: expected[k][0])]
        assert mean.scores == approx_forward([s / n for s, n in expected], lm.config, keys=64)
        assert mean.label == choices[max(range(3), key=lambda k: expected[k][0] / expected[k][1])]
    # the continuation is what the text adds: a separator other than a space changes it
    dashed = engine.score_choices(prompts[:1], choices, separator=" - ")[0]
    assert dashed.scores == approx_forward([s for s, _ in hf_choice_scores(hf_lm, tokenizer, prompts[0], choices,
                                                                           " - ")], lm.config, keys=64)
    # whitespace at the end of the prompt moves into the continuation (as lm-evaluation-harness)
    trailing = engine.score_choices([prompts[0] + " "], choices, separator="")[0]
    assert trailing.scores == approx_forward(results[0].scores, lm.config, keys=64)
    assert engine.score_choices([""], choices)[0].error
    with pytest.raises(ValueError, match="normalize"):
        engine.score_choices(prompts, choices, normalize="max")


def test_classify_equals_transformers_sequence_classification(tokenizer):
    cfg = PersimmonConfig.tiny(**LIVELY, num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"}, pad_token_id=1)
    model = random_model(PersimmonForSequenceClassification, cfg)
    hf = hf_twin(model)
    texts = ["short", "a much longer text about cats and dogs and books " * 3, "", "medium sized text here",
             "tiny"]
    engine = Engine(model, tokenizer, max_batch_size=4, prefill_token_budget=64)
    results = engine.classify(texts)
    assert results[2].error and results[2].label is None
    for text, res in zip(texts, results):
        if not text:
            continue
        with torch.no_grad():
            logits = hf(torch.tensor([tokenizer.encode(text)])).logits[0]
        probs = logits.softmax(-1)
        # a probability moves by at most (its size x) the change of the logit differences
        tol = 2 * forward_tol(cfg, torch.float32, keys=len(tokenizer.encode(text)), magnitude=logits.abs().max().item())
        assert res.probs == pytest.approx(probs.tolist(), abs=tol)
        assert res.label == cfg.id2label[int(probs.argmax())]
        assert res.score == pytest.approx(probs.max().item(), abs=tol)


@pytest.mark.parametrize("packed", [None, False], ids=["auto", "plain-linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_16_bit_engine_equals_transformers_in_the_same_dtype(dtype, packed):
    """bf16 / fp16 against the reference in that dtype (not against our own fp32): each generated token's
    log-probability from the engine is no further from the fp32 answer (the same bf16 weights
    in fp32) than transformers' bf16 forward is, and the engine's greedy choice is transformers'
    argmax there too, up to near-ties. `plain-linear` forces the F.linear path (no oneDNN
    packing) on any CPU: what a CPU without AVX-512 runs."""
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY)).to(dtype)
    hf = hf_twin(model)
    exact = hf_twin(model).float()
    assert next(hf.parameters()).dtype == dtype
    prompts = prompts_of([6, 15, 9, 21])
    engine = Engine(model, None, max_batch_size=4, max_seq_len=48, packed_cpu_linears=packed)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=0))
    assert next(model.parameters()).dtype == dtype
    if packed is False:
        assert not engine.runner.packed and "forward" not in model.lm_head.__dict__
    checked = agree = 0
    ours, theirs, truth = [], [], []
    for p, o in zip(prompts, outs):
        seq = p + o.token_ids
        with torch.no_grad():
            logp = hf(torch.tensor([seq])).logits[0].float().log_softmax(-1)
            logp32 = exact(torch.tensor([seq])).logits[0].log_softmax(-1)
        for j, tok in enumerate(o.token_ids):
            row = logp[len(p) - 1 + j]
            ours.append(o.logprobs[j].logprob)
            theirs.append(row[tok].item())
            truth.append(logp32[len(p) - 1 + j, tok].item())
            top2 = row.topk(2).values
            if (top2[0] - top2[1]).item() > 0.1:  # a clear winner: both must pick it
                checked += 1
                agree += tok == int(row.argmax())
    no_less_precise(torch.tensor(ours), torch.tensor(theirs), torch.tensor(truth))
    assert checked >= 16 and agree == checked


def test_static_decode_shapes_give_identical_tokens(lm, hf_lm, monkeypatch):
    """The fixed-shape decode step (what CUDA graphs replay) equals transformers too."""
    prompts = prompts_of([5, 31, 2, 17, 9])
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    engine = Engine(lm, None, max_batch_size=3, max_seq_len=200, decode_mode="static", kv_block_size=4)
    assert engine.decode_mode == "static"
    calls = []
    original = ModelRunner._static_step
    monkeypatch.setattr(ModelRunner, "_static_step", lambda self, *a: calls.append(a[3].shape) or original(self, *a))
    for p, o in zip(prompts, engine.generate(prompts, params)):
        assert o.token_ids == hf_greedy(hf_lm, p, 14)
    # decode-only steps ran with bucketed shapes: batch 1/2/4 (capped at 3), table widths powers of 2
    assert calls and {b for b, _ in calls} <= {1, 2, 3} and all(w & (w - 1) == 0 for _, w in calls)


def test_cuda_graph_mode_needs_cuda(lm):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU refusal; the CUDA path is tested in test_cuda_graph_decode_on_gpu")
    with pytest.raises(ValueError, match="CUDA"):
        Engine(lm, None, max_batch_size=2, max_seq_len=32, decode_mode="cuda_graph").runner


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_graph_decode_on_gpu(dtype):
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))
    prompts = prompts_of([5, 31, 2, 17, 9])
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    eager = Engine(model, None, max_batch_size=3, max_seq_len=160, dtype=dtype, device="cuda",
                   decode_mode="dynamic").generate(prompts, params)
    graphed_engine = Engine(model, None, max_batch_size=3, max_seq_len=160, decode_mode="cuda_graph")
    graphed = graphed_engine.generate(prompts, params)
    assert graphed_engine.runner._graphs  # graphs were captured and replayed
    assert graphed_engine.generate(prompts, params) == graphed  # replays are deterministic
    agree = sum(a.token_ids == b.token_ids for a, b in zip(eager, graphed))
    assert agree >= (5 if dtype == "float32" else 4)


def test_score_choices_many_rows_share_the_instruction_blocks(lm, hf_lm, tokenizer, attention_path):
    """Many prompts sharing a long instruction, choices of different lengths (two differing only
    in their last token): every score equals transformers; the instruction's blocks and each
    prompt's own blocks are computed once, not once per (prompt, choice) row."""
    instruction = "Label the sentiment of each review as positive or negative. Review:"
    reviews = [" lovely film", " dull", " a slow and boring story with no end", " great cast", " meh",
               " the best book I read this year"]
    prompts = [instruction + r + " Sentiment:" for r in reviews]
    choices = ["positive", "negative", "neutral or mixed feelings", "a", "c"]  # "a", "c": 2 tokens, same first
    engine = Engine(lm, tokenizer, max_batch_size=7, max_seq_len=256, kv_block_size=4)
    results = engine.score_choices(prompts, choices)
    encoded = [tokenizer.encode(p) for p in prompts]
    for prompt, res in zip(prompts, results):
        expected = [x for x, _ in hf_choice_scores(hf_lm, tokenizer, prompt, choices)]
        assert res.error is None
        assert res.scores == approx_forward(expected, lm.config, keys=256)
        assert res.label == choices[max(range(len(choices)), key=expected.__getitem__)]
    conts = [[tokenizer.encode(prompt + " " + c)[len(p):] for c in choices] for prompt, p in zip(prompts, encoded)]
    rows = {tuple(p + c[:-1]) for p, cs in zip(encoded, conts) for c in cs}
    assert len(rows) < len(prompts) * len(choices)  # the two near-identical choices share one row
    computed = engine.stats()["prefill_tokens"]
    naive = sum(len(r) for r in rows)
    # each prompt's full blocks once; per row at most a partial block of the prompt plus its choice
    bound = sum(len(p) // 4 * 4 for p in encoded) + sum(3 + len(r) - len(p) for p in encoded for r in rows
                                                          if list(r[:len(p)]) == p)
    assert computed <= bound < naive
    # scoring again finds the prompts' blocks in the cache
    again = engine.score_choices(prompts, choices)
    assert [x for r in again for x in r.scores] == approx_forward([x for r in results for x in r.scores], lm.config,
                                                                  keys=256)
    assert engine.stats()["prefill_tokens"] - computed < computed


def test_packed_cpu_linears_in_place_match_plain_and_follow_casts():
    if cpu_packing_unsupported(torch.float32):
        pytest.skip(f"no oneDNN packing here ({cpu_packing_unsupported(torch.float32)}); plain F.linear is tested")
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor([prompts_of([12])[0]])
    reference_bf16 = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY)).to(torch.bfloat16)
    with torch.no_grad():
        plain, plain_bf16 = model(x).logits, reference_bf16(x).logits.float()
    prompts = prompts_of([5, 17, 9])
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    unpacked = Engine(model, None, max_batch_size=3, max_seq_len=48, packed_cpu_linears=False).generate(prompts, params)
    packed_engine = Engine(model, None, max_batch_size=3, max_seq_len=48, packed_cpu_linears=True)
    packed = packed_engine.generate(prompts, params)
    assert "forward" in model.lm_head.__dict__  # the packed path is really in use
    # in place: the plain weights are gone (weights once in memory), state_dict unpacks on the fly
    assert model.lm_head.weight.numel() == 0 and model.model.layers[0].mlp.dense_h_to_4h.weight.numel() == 0
    state = model.state_dict()
    assert state.keys() == originals.keys() and all(torch.equal(state[k], originals[k]) for k in originals)
    mlp = model.model.layers[0].mlp
    assert "forward" in mlp.__dict__  # ReLU fused into the first matmul, square in place
    h = torch.randn(7, model.config.hidden_size)
    w1, b1 = originals["model.layers.0.mlp.dense_h_to_4h.weight"], originals["model.layers.0.mlp.dense_h_to_4h.bias"]
    w2, b2 = originals["model.layers.0.mlp.dense_4h_to_h.weight"], originals["model.layers.0.mlp.dense_4h_to_h.bias"]
    with torch.no_grad():
        expected = (w2 @ torch.relu(w1 @ h.T + b1[:, None]).square()).T + b2
        cfg = model.config  # two chained matmuls: hidden then intermediate products
        mlp_tol = accumulation_tol(torch.float32, cfg.hidden_size + cfg.intermediate_size, expected.abs().max().item())
        assert (mlp(h) - expected).abs().max().item() <= mlp_tol
        assert_forward_close(model(x).logits, plain, cfg)
    assert [a.token_ids for a in unpacked] == [b.token_ids for b in packed]
    # a later engine that casts the model unpacks, casts and repacks where this CPU packs bf16
    bf16 = Engine(model, None, max_batch_size=3, max_seq_len=48, dtype="bfloat16")
    assert bf16.runner.packed == (cpu_packing_unsupported(torch.bfloat16) is None)
    assert ("forward" in model.lm_head.__dict__) == bf16.runner.packed
    with torch.no_grad():
        logits = model(x).logits
    assert logits.dtype == torch.bfloat16
    no_less_precise(logits, plain_bf16, plain)  # as close to fp32 as the plain bf16 model
    assert all(len(c.token_ids) == 10 for c in bf16.generate(prompts, params))
    # moving the model by hand unpacks first too
    model.to(torch.float32)
    assert model.lm_head.weight.shape == originals["lm_head.weight"].shape
    assert torch.equal(model.state_dict()["lm_head.weight"], originals["lm_head.weight"].bfloat16().float())


def test_packing_is_asked_of_torch_and_refused_clearly_where_unsupported(monkeypatch):
    """The packed path runs only where torch's oneDNN says it can; elsewhere F.linear, and an
    explicit request names the reason instead of oneDNN's error from deep in a forward."""
    from model import cpu_packing

    monkeypatch.delenv("PERSIMMON_PACKED_LINEARS", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    why = cpu_packing_unsupported(torch.bfloat16)
    assert why and "AVX-512" in why
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))
    with pytest.raises(ValueError, match="packed_cpu_linears=True, but oneDNN's bf16"):
        Engine(model, None, max_batch_size=2, max_seq_len=32, dtype="bfloat16", packed_cpu_linears=True)
    engine = Engine(model, None, max_batch_size=2, max_seq_len=32, dtype="bfloat16")
    assert not engine.runner.packed and not any("_packed_weight" in m.__dict__ for m in model.modules())
    assert len(engine.generate(prompts_of([5]), SamplingParams(max_new_tokens=3, ignore_eos=True))[0].token_ids) == 3
    monkeypatch.setenv("PERSIMMON_PACKED_LINEARS", "0")
    assert "PERSIMMON_PACKED_LINEARS" in cpu_packing_unsupported(torch.float32)
    monkeypatch.setattr(cpu_packing.platform, "machine", lambda: "aarch64")
    monkeypatch.delenv("PERSIMMON_PACKED_LINEARS")
    assert "x86" in cpu_packing_unsupported(torch.float32)


def test_dynamic_rope_rows_independent_of_batch_and_equal_transformers_alone():
    """Dynamic NTK rope past max_position_embeddings: each row uses its own length, so it
    matches transformers generating that prompt alone, whatever shares its batch."""
    cfg = PersimmonConfig.tiny(**LIVELY, max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 3.0})
    model = random_model(PersimmonForCausalLM, cfg)
    prompts = prompts_of([5, 21, 12, 3])  # one starts past the limit, others cross it while decoding
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    together = Engine(model, None, max_batch_size=4, max_seq_len=48).generate(prompts, params)
    for prompt, row in zip(prompts, together):
        alone = Engine(model, None, max_batch_size=1, max_seq_len=48).generate([prompt], params)[0]
        assert row.token_ids == alone.token_ids
        # a fresh twin per prompt: transformers keeps the longest length it has seen between calls
        assert row.token_ids == hf_greedy(hf_twin(model), prompt, 14)
    # the shared-prefix path must not change them either (blocks of rows past the limit are never shared)
    shared = [[7] * 10 + p for p in prompts]
    with_prefix = Engine(model, None, max_batch_size=4, max_seq_len=48, kv_block_size=4).generate(shared, params)
    assert [c.token_ids for c in with_prefix] == [hf_greedy(hf_twin(model), p, 14) for p in shared]


def test_preemption_under_a_small_kv_pool_gives_the_same_tokens(lm, hf_lm, attention_path):
    """A pool far smaller than the rows in flight want: rows grow block by block, the most
    recently admitted are preempted and recomputed, and every row still equals transformers."""
    prompts = prompts_of([5, 14, 2, 17, 9, 12, 3, 12, 25], seed=3)
    news = [24, 17, 30, 12, 18, 15, 26, 9, 14]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    engine = Engine(lm, None, max_batch_size=6, max_seq_len=80, kv_block_size=4, kv_cache_gib=tiny_pool(14, 4))
    outs = engine.generate(prompts, params)
    stats = engine.stats()
    assert stats["kv_tokens_capacity"] == 14 * 4 and stats["preemptions"] > 0
    assert stats["kv_tokens_peak"] <= 14 * 4
    for p, n, o in zip(prompts, news, outs):
        assert o.token_ids == hf_greedy(hf_lm, p, n)
    # a seeded sampled row draws the same tokens with and without preemption, whatever its neighbours
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, top_k=40, seed=11, ignore_eos=True)
    roomy = Engine(lm, None, max_batch_size=6, max_seq_len=80).generate([prompts[1]], sampled)[0]
    tight = Engine(lm, None, max_batch_size=6, max_seq_len=80, kv_block_size=4, kv_cache_gib=tiny_pool(14, 4))
    crowd = tight.generate(prompts[:4] + [prompts[1]], params[:4] + [sampled])
    assert tight.stats()["preemptions"] > 0
    assert crowd[4].token_ids == roomy.token_ids


def test_row_too_long_for_the_whole_pool_gets_an_error_and_neighbours_finish(lm, hf_lm):
    engine = Engine(lm, None, max_batch_size=4, max_seq_len=200, kv_block_size=4, kv_cache_gib=tiny_pool(10, 4))
    prompts = prompts_of([6, 30, 5])
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=8, ignore_eos=True),
                                     SamplingParams(max_new_tokens=20, ignore_eos=True),  # 50 tokens > 40
                                     SamplingParams(max_new_tokens=8, ignore_eos=True)])
    assert outs[1].finish_reason == "error"
    assert outs[1].error_kind == "kv_cache_too_small" and "50 tokens" in outs[1].error and "40 tokens" in outs[1].error
    assert outs[0].token_ids == hf_greedy(hf_lm, prompts[0], 8) and outs[2].token_ids == hf_greedy(hf_lm, prompts[2], 8)


def test_defaults_cost_no_memory_and_stats_report_sizing(lm):
    """max_batch_size caps rows in flight (default 256) and max_seq_len defaults to the model's
    context: the KV pool is the stated budget, never 256 x max_seq_len."""
    engine = Engine(lm, None, kv_cache_gib=tiny_pool(100, 16))
    stats = engine.stats()
    assert stats["max_batch_size"] == 256 and stats["max_seq_len"] == lm.config.max_position_embeddings
    assert stats["kv_tokens_capacity"] == 100 * 16
    per_token = 2 * lm.config.num_hidden_layers * lm.config.hidden_size * 4
    assert stats["kv_cache_bytes"] == (100 + 2) * 16 * per_token
    for key in ("kv_tokens_peak", "rows_in_flight_peak", "preemptions", "prefix_cache_hit_tokens"):
        assert stats[key] == 0
    engine.generate(prompts_of([5, 9]), SamplingParams(max_new_tokens=3, ignore_eos=True))
    stats = engine.stats()
    assert stats["rows_in_flight_peak"] == 2 and stats["kv_tokens_peak"] == 2 * 16
    with pytest.raises(ValueError, match="kv_cache_gib"):
        Engine(lm, None, kv_cache_gib=0)


def test_default_budget_is_a_share_of_free_memory(lm, monkeypatch):
    """No kv_cache_gib: fraction x free memory after the weights, less activations; a replica
    sharing the device gets its share of it (here 64 MiB free of 1 GiB)."""
    from model import capacity

    total, free = 2**30, 64 * 2**20
    monkeypatch.setattr(capacity, "cpu_memory", lambda: (total, free))
    cfg = lm.config
    per_block = 16 * capacity.kv_bytes_per_token(cfg, torch.float32)
    headroom = capacity.activation_bytes(cfg, torch.float32, 4096 + 256, 256)
    weights = capacity.weights_bytes(cfg, torch.float32)
    whole = Engine(lm, None, max_seq_len=512).runner.num_blocks
    assert whole == int(min(0.9 * free, 0.9 * total - weights) - headroom) // per_block
    shared = Engine(lm, None, max_seq_len=512, memory_share=0.05).runner.num_blocks
    assert shared == int(min(0.9 * free, 0.9 * total * 0.05 - weights) - headroom) // per_block
    assert 0 < shared < whole
    capped = Engine(lm, None, max_batch_size=2, max_seq_len=64).runner.num_blocks
    assert capped == 2 * 4 + 2  # never more than max_batch_size rows of max_seq_len could use
    monkeypatch.setattr(capacity, "cpu_memory", lambda: (total, 2**20))  # 1 MiB free: nothing fits
    with pytest.raises(ValueError, match="no room for a KV cache"):
        Engine(lm, None, max_seq_len=512)


def test_dynamic_rope_rows_recomputed_after_preemption_equal_transformers():
    """A preempted row is recomputed in one prefill; with dynamic NTK rope its generated
    tokens' keys must get the rotary length they had when decoded one by one (found by review:
    before, the recompute changed greedy tokens past the limit)."""
    cfg = PersimmonConfig.tiny(**LIVELY, max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = random_model(PersimmonForCausalLM, cfg)
    preempted = 0
    for seed in (4, 7):
        prompts = prompts_of([12, 12, 12, 12], seed=seed)
        engine = Engine(model, None, max_batch_size=4, max_seq_len=64, kv_block_size=4,
                        kv_cache_gib=tiny_pool(14, 4), prefix_caching=False)
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=30, ignore_eos=True))
        preempted += engine.stats()["preemptions"]
        for p, o in zip(prompts, outs):
            assert o.token_ids == hf_greedy(hf_twin(model), p, 30)
    assert preempted > 0


def test_score_rows_with_the_same_tokens_from_different_prompts(lm, hf_lm):
    """Prompt A + choice [8, 9] and prompt B = A + [8] with choice [10] make the same row
    tokens; each must be scored from its own prompt's end (found by review)."""
    a, b = [5, 6, 7], [5, 6, 7, 8]
    res = Engine(lm, None, max_batch_size=4, max_seq_len=32).score_choices([a, b], [[8, 9], [10]], add_bos=False)
    for prompt, r in zip([a, b], res):
        with torch.no_grad():
            expected = []
            for c in ([8, 9], [10]):
                logp = hf_lm(torch.tensor([prompt + c])).logits[0].float().log_softmax(-1)
                expected.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(c)))
        assert r.scores == approx_forward(expected, lm.config, keys=8)


def test_an_exception_while_queueing_leaves_nothing_behind(lm):
    engine = Engine(lm, None, max_batch_size=4, max_seq_len=64)
    prompts = prompts_of([5, 9, 7])
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate(prompts[:2], [SamplingParams(max_new_tokens=40, ignore_eos=True), None])
    assert not engine.scheduler.waiting and not engine.scheduler.running
    out = engine.generate(prompts[2:], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    fresh = Engine(lm, None, max_batch_size=4, max_seq_len=64).generate(prompts[2:], SamplingParams(
        max_new_tokens=20, ignore_eos=True))[0]
    assert (out.num_prompt_tokens, out.token_ids) == (fresh.num_prompt_tokens, fresh.token_ids)


def test_argument_checks(lm):
    for kwargs, match in [(dict(max_seq_len=0), "max_seq_len"), (dict(kv_cache_gib=float("inf")), "kv_cache_gib"),
                          (dict(kv_cache_gib=True), "kv_cache_gib"), (dict(memory_fraction=1.5), "memory_fraction"),
                          (dict(memory_share=0), "memory_share"), (dict(kv_block_size=10**6), "kv_block_size")]:
        with pytest.raises(ValueError, match=match):
            Engine(lm, None, **kwargs)
    for kwargs, match in [(dict(stop=[1]), "stop"), (dict(top_k=True), "top_k"), (dict(temperature="0.5"), "temperature"),
                          (dict(temperature=float("inf")), "temperature"), (dict(stop_token_ids=5), "stop_token_ids"),
                          (dict(json_schema=5), "json_schema: must be a dict \\(the schema\\) or a string, got 5"),
                          (dict(truncate="right"), "truncate"), (dict(choice=[""]), "choice")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)
    # values given in Python as tuples are lists; empty stop strings are dropped; the rules between fields
    p = SamplingParams(stop=("end", ""), stop_token_ids=(3, 4))
    assert p.stop == ["end"] and p.stop_token_ids == [3, 4] and SamplingParams(stop="a,b").stop == ["a,b"]
    assert SamplingParams(stop=None).stop == [] and SamplingParams(stop_token_ids=None).stop_token_ids == []
    for args, kwargs in (((64,), {}), ((), {"bogus": 1})):  # settings are named, and known
        with pytest.raises(TypeError):
            SamplingParams(*args, **kwargs)
    for kwargs, match in [(dict(regex="a", choice=["x"]), "give one of json_schema, regex, choice"),
                          (dict(json_schema={}, stop=["}"]), "stop strings would cut a json_schema completion"),
                          (dict(top_p=0), "^top_p: must be > 0, got 0$"), (dict(seed=-1), "^seed: must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)
    # temperatures too small for fp32 logits / T act as greedy instead of overflowing
    prompt = prompts_of([6])[0]
    greedy = Engine(lm, None, max_batch_size=1, max_seq_len=32).generate([prompt], SamplingParams(max_new_tokens=6))
    tiny_t = Engine(lm, None, max_batch_size=1, max_seq_len=32).generate(
        [prompt], SamplingParams(max_new_tokens=6, temperature=1e-50, seed=1))
    assert tiny_t[0].token_ids == greedy[0].token_ids


def test_a_second_engine_on_the_same_model_makes_the_first_refuse():
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))
    first = Engine(model, None, max_batch_size=2, max_seq_len=32)
    Engine(model, None, max_batch_size=2, max_seq_len=32, dtype="bfloat16")
    with pytest.raises(RuntimeError, match="one engine per model"):
        first.generate(prompts_of([5]), SamplingParams(max_new_tokens=3))


def test_truncate_left_keeps_at_least_half_the_context(lm):
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=64)
    long = prompts_of([100])[0]
    out = engine.generate([long], SamplingParams(max_new_tokens=1000, truncate="left", ignore_eos=True))[0]
    assert out.num_prompt_tokens == 32 and out.finish_reason == "length" and out.num_generated_tokens == 32
    short = engine.generate([long], SamplingParams(max_new_tokens=8, truncate="left", ignore_eos=True))[0]
    assert short.num_prompt_tokens == 56 and short.num_generated_tokens == 8


def test_truncate_left_keeps_the_tail_and_equals_transformers_on_it(lm, hf_lm):
    """truncate='left' keeps the prompt's last tokens: the completion is transformers' greedy
    continuation of those tokens alone (the 56 of a 64-token max_seq_len less 8 new ones, and
    at least half of max_seq_len when max_new_tokens is large)."""
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=64)
    long = prompts_of([100], seed=4)[0]
    short = engine.generate([long], SamplingParams(max_new_tokens=8, truncate="left", ignore_eos=True))[0]
    assert short.num_prompt_tokens == 56 and short.token_ids == hf_greedy(hf_lm, long[-56:], 8)
    assert short.token_ids != hf_greedy(hf_lm, long[:56], 8)  # the head would continue otherwise
    half = engine.generate([long], SamplingParams(max_new_tokens=1000, truncate="left", ignore_eos=True))[0]
    assert half.num_prompt_tokens == 32 and half.token_ids == hf_greedy(hf_lm, long[-32:], 32)
