"""Engine vs transformers: greedy tokens, generate tensors, scoring, classification, sampling,
stop conditions, continuous batching and per-row errors."""

import pytest
import torch
from conftest import hf_twin, random_model

from model import (
    Engine,
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonTokenizer,
    SamplingParams,
)
from model.engine import Runner
from model.tiny_tokenizer import train_tiny_tokenizer

# a larger init spread makes random models emit varied tokens instead of one repeated id
LIVELY = dict(initializer_range=0.3)


def prompts_of(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def lm():
    return random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))


@pytest.fixture(scope="module")
def hf_lm(lm):
    return hf_twin(lm)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(d)
    return PersimmonTokenizer.from_pretrained(d)


def count_prefill_tokens(monkeypatch) -> list[int]:
    """Patch Runner.prefill to record how many tokens each prefill call computes."""
    seen = []
    original = Runner.prefill

    def counting(self, slots, tokens, starts):
        seen.append(sum(len(t) for t in tokens))
        return original(self, slots, tokens, starts)

    monkeypatch.setattr(Runner, "prefill", counting)
    return seen


def hf_greedy(hf, prompt, new, eos=None):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("attention_chunk", [8, 1])  # 1: every decode row attends over its own length
def test_greedy_tokens_identical_to_transformers_across_slot_refills(lm, hf_lm, attention_chunk, monkeypatch):
    monkeypatch.setattr("model.engine.ATTENTION_CHUNK", attention_chunk)
    # 9 prompts of mixed lengths through 3 slots: rows finish and slots are refilled many times
    prompts = prompts_of([5, 31, 2, 17, 9, 40, 3, 12, 25])
    news = [24, 7, 30, 12, 18, 5, 26, 9, 14]
    engine = Engine(lm, None, max_batch_size=3, max_seq_len=80)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in news]
    outs = engine.generate(prompts, params)
    assert len({tuple(o.token_ids) for o in outs}) > 5  # the model emits varied outputs
    for p, n, o in zip(prompts, news, outs):
        assert o.token_ids == hf_greedy(hf_lm, p, n)
        assert o.finish_reason == "length" and o.num_generated_tokens == n
        assert o.num_prompt_tokens == len(p)


def test_greedy_output_independent_of_batch_and_slot(lm):
    prompts = prompts_of([6, 19, 11, 27, 4, 14])
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    together = Engine(lm, None, max_batch_size=6, max_seq_len=64).generate(prompts, params)
    one_slot = Engine(lm, None, max_batch_size=1, max_seq_len=64).generate(prompts, params)
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
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert ours.dtype == torch.long
    assert torch.equal(ours, ref)
    assert torch.equal(lm.generate(ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                                   eos_token_id=[]), ref_free)


def test_shared_prefix_is_prefilled_once_and_outputs_unchanged(lm, hf_lm, monkeypatch):
    shared = prompts_of([24], seed=5)[0]
    prompts = [shared + p for p in prompts_of([3, 6, 2, 5], seed=6)]
    seen = count_prefill_tokens(monkeypatch)
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=64)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True))
    # the 24 shared tokens are computed once, not once per row
    assert sum(seen) == 24 + sum(len(p) - 24 for p in prompts)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(hf_lm, p, 8)


def test_logprobs_match_transformers_scores(lm, hf_lm):
    prompt = prompts_of([7])[0]
    out = Engine(lm, None, max_batch_size=2, max_seq_len=32).generate(
        [prompt], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=True))[0]
    ref = hf_lm.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    expected = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(ref.logits, out.token_ids)]
    assert out.logprobs == pytest.approx(expected, abs=1e-4)


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
    assert mixed[1].token_ids == alone[0].token_ids and mixed[5].token_ids == alone[1].token_ids
    assert mixed[1].error is None
    truncated = engine.generate([long_prompt], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                              truncate="left"))[0]
    assert truncated.finish_reason == "length" and truncated.num_prompt_tokens == 24 - 6


def test_score_choices_equals_transformers_log_softmax(lm, hf_lm, tokenizer):
    engine = Engine(lm, tokenizer, max_batch_size=4, max_seq_len=64)
    prompts = ["Review: the film was lovely. Sentiment:", "Review: dull and slow. Sentiment:"]
    choices = [" positive", " negative", " not sure at all"]
    results = engine.score_choices(prompts, choices)
    for prompt, res in zip(prompts, results):
        p_ids = tokenizer.encode(prompt)
        expected = []
        for choice in choices:
            c_ids = tokenizer.encode(choice, add_bos=False)
            ids = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logp = hf_lm(ids).logits[0].float().log_softmax(-1)
            expected.append(sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(c_ids)))
        assert res.scores == pytest.approx(expected, abs=1e-4)
        assert res.label == choices[max(range(3), key=expected.__getitem__)]
    assert engine.score_choices([""], choices)[0].error


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
        assert res.probs == pytest.approx(probs.tolist(), abs=1e-5)
        assert res.label == cfg.id2label[int(probs.argmax())]
        assert res.score == pytest.approx(probs.max().item(), abs=1e-5)


def test_bfloat16_engine_runs_and_mostly_agrees(lm):
    prompts = prompts_of([6, 15, 9])
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    fp32 = Engine(lm, None, max_batch_size=3, max_seq_len=32).generate(prompts, params)
    bf16_model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))
    bf16 = Engine(bf16_model, None, max_batch_size=3, max_seq_len=32, dtype="bfloat16").generate(prompts, params)
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    assert all(o.finish_reason == "length" and len(o.token_ids) == 8 for o in bf16)
    assert sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fp32, bf16)) >= 2


def test_static_decode_shapes_give_identical_tokens(lm, hf_lm):
    """The fixed-shape decode step (what CUDA graphs replay) equals transformers too."""
    prompts = prompts_of([5, 31, 2, 17, 9])
    params = SamplingParams(max_new_tokens=14, ignore_eos=True)
    engine = Engine(lm, None, max_batch_size=2, max_seq_len=200, decode_mode="static")
    assert engine.runner.buckets == [128, 200]
    for p, o in zip(prompts, engine.generate(prompts, params)):
        assert o.token_ids == hf_greedy(hf_lm, p, 14)


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
    agree = sum(a.token_ids == b.token_ids for a, b in zip(eager, graphed))
    assert agree >= (5 if dtype == "float32" else 4)


def test_score_choices_batched_groups_with_shared_prefix(lm, hf_lm, tokenizer, monkeypatch):
    """Many prompts sharing a long instruction, choices of different lengths, several groups:
    every score equals transformers, and the instruction is prefilled once per call."""
    instruction = "Label the sentiment of each review as positive or negative. Review:"
    reviews = [" lovely film", " dull", " a slow and boring story with no end", " great cast", " meh",
               " the best book I read this year"]
    prompts = [instruction + r + " Sentiment:" for r in reviews]
    choices = [" positive", " negative", " neutral or mixed feelings"]
    seen = count_prefill_tokens(monkeypatch)
    engine = Engine(lm, tokenizer, max_batch_size=7, max_seq_len=256)  # groups of 2 prompts x 3 choices
    results = engine.score_choices(prompts, choices)
    encoded = [tokenizer.encode(p) for p in prompts]
    shared = min(len(e) for e in encoded)
    for n in range(shared):
        if len({e[n] for e in encoded}) > 1:
            shared = n
            break
    assert shared >= 8
    assert sum(seen) == shared + sum(len(e) - shared for e in encoded)
    for p_ids, res in zip(encoded, results):
        expected = []
        for choice in choices:
            c_ids = tokenizer.encode(choice, add_bos=False)
            with torch.no_grad():
                logp = hf_lm(torch.tensor([p_ids + c_ids])).logits[0].float().log_softmax(-1)
            expected.append(sum(logp[len(p_ids) - 1 + j, t].item() for j, t in enumerate(c_ids)))
        assert res.error is None
        assert res.scores == pytest.approx(expected, abs=1e-4)


def test_packed_cpu_linears_match_plain_and_follow_casts():
    model = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(**LIVELY))
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
    mlp = model.model.layers[0].mlp
    assert "forward" in mlp.__dict__  # ReLU fused into the first matmul, square in place
    h = torch.randn(7, model.config.hidden_size)
    with torch.no_grad():
        expected = mlp.dense_4h_to_h.weight @ torch.relu(mlp.dense_h_to_4h.weight @ h.T + mlp.dense_h_to_4h.bias[:, None]).square()
        assert (mlp(h) - (expected.T + mlp.dense_4h_to_h.bias)).abs().max().item() <= 1e-4
    with torch.no_grad():
        assert (model(x).logits - plain).abs().max().item() <= 1e-4
    assert [a.token_ids for a in unpacked] == [b.token_ids for b in packed]
    # a later engine that casts the model repacks from the cast weights, never stale copies
    bf16 = Engine(model, None, max_batch_size=3, max_seq_len=48, dtype="bfloat16", packed_cpu_linears=True)
    with torch.no_grad():
        logits = model(x).logits
    assert logits.dtype == torch.bfloat16 and (logits.float() - plain_bf16).abs().max().item() <= 0.05
    assert all(len(c.token_ids) == 10 for c in bf16.generate(prompts, params))


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
    # the shared-prefix path must not change them either
    shared = [[7] * 10 + p for p in prompts]
    with_prefix = Engine(model, None, max_batch_size=4, max_seq_len=48).generate(shared, params)
    assert [c.token_ids for c in with_prefix] == [hf_greedy(hf_twin(model), p, 14) for p in shared]
