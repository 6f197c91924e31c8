"""The sampler against an external reference: transformers' logits warpers on fixed logits
(ties and top-p boundaries included), and the empirical distribution of thousands of seeded
first-token draws against softmax(logits / T) after those warpers, by total variation distance.
Seeds: different seeds differ, the same seed gives the same tokens whatever the batch-mates,
the row's place in the batch, or a preemption."""

import math

import pytest
import torch
from conftest import random_model

from model import Engine, PersimmonConfig, PersimmonForCausalLM, SamplingParams
from model.sampling import Sampler, filter_logits

transformers = pytest.importorskip("transformers", reason="transformers is the reference for the warpers")


def hf_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' generate order: temperature, then top-k, then top-p."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.clone()[None]
    ids = torch.zeros(1, 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores[0]


CASES = [
    # (logits, temperature, top_k, top_p)
    ([2.0, 1.0, 1.0, 0.5, 0.5, 0.5, -1.0, -3.0], 1.0, 3, 1.0),  # top-k boundary inside a tie: all ties kept
    ([2.0, 1.0, 1.0, 0.5, 0.5, 0.5, -1.0, -3.0], 1.0, 0, 0.8),  # top-p boundary inside a tie
    ([0.0] * 8, 1.0, 0, 0.5),  # all tied: half the mass
    ([5.0, 0.0, 0.0, 0.0], 1.0, 0, 0.1),  # one token already holds more than top_p
    ([1.0, 2.0, 3.0, 4.0, 5.0], 0.7, 2, 0.9),
    ([1.0, 2.0, 3.0, 4.0, 5.0], 1.5, 0, 0.3),
    ([3.0, -math.inf, 1.0, 1.0], 1.0, 2, 0.95),  # already-masked tokens stay masked
]


@pytest.mark.parametrize("logits,temperature,top_k,top_p", CASES)
def test_filter_equals_transformers_warpers(logits, temperature, top_k, top_p):
    x = torch.tensor(logits)
    ours = filter_logits(x / temperature, top_k, top_p)
    ref = hf_filter(x, temperature, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (ours, ref)
    kept = ~torch.isinf(ref)
    assert torch.allclose(ours[kept], ref[kept])
    # batched, one row per case with other rows' settings beside it, gives the same
    batch = filter_logits(torch.stack([x / temperature, torch.zeros_like(x)]), [top_k, 0], [top_p, 1.0])
    assert torch.equal(torch.isinf(batch[0]), torch.isinf(ref)) and not torch.isinf(batch[1]).any()


def test_seeded_draws_follow_the_filtered_distribution():
    """4000 first-token draws with seeds 0..3999: the empirical distribution is within a total
    variation distance of 0.05 of softmax(filtered logits). With 4000 draws over ~10 kept
    tokens the expected TV of a correct sampler is about 0.5 * sum sqrt(p(1-p)/n) <= 0.025, and
    a sampler that ignored top-k / top-p, or the temperature, is off by more than 0.1 here."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=g) * 2.0
    n = 4000
    for temperature, top_k, top_p in ((0.8, 10, 1.0), (1.3, 0, 0.7), (1.0, 20, 0.9)):
        target = hf_filter(logits, temperature, top_k, top_p).softmax(-1)
        params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=s) for s in range(n)]
        tokens = Sampler()(logits.expand(n, -1).clone(), params, list(range(n)), [0] * n)
        empirical = torch.bincount(torch.tensor(tokens), minlength=64).float() / n
        tv = 0.5 * (empirical - target).abs().sum().item()
        assert tv < 0.05, (temperature, top_k, top_p, tv)
        assert empirical[target == 0].sum() == 0  # filtered tokens are never drawn
        wrong = logits.softmax(-1)  # what an unfiltered, untempered sampler would follow
        assert 0.5 * (empirical - wrong).abs().sum().item() > 0.1


def test_one_seed_draws_fresh_randomness_at_every_step():
    """A row's n-th token uses its own uniform number: 4000 draws of one seed at steps 0..3999
    on fixed logits follow the filtered distribution like 4000 seeds do (same TV bound of 0.05,
    same justification as above). A sampler that reused one number for every step of a row
    would draw a single token 4000 times (TV close to 1)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, generator=g) * 2.0
    n = 4000
    target = hf_filter(logits, 0.9, 20, 0.95).softmax(-1)
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=5)] * n
    tokens = Sampler()(logits.expand(n, -1).clone(), params, [5] * n, list(range(n)))
    empirical = torch.bincount(torch.tensor(tokens), minlength=64).float() / n
    assert 0.5 * (empirical - target).abs().sum().item() < 0.05


def test_engine_row_samples_a_new_token_each_step():
    """With the LM head zeroed every logit is 0, so each sampled token is uniform over the 512
    ids whatever the context. 300 tokens of one seeded row then hold about
    512 * (1 - (511/512)**300) = 227 distinct ids (standard deviation about 7); fewer than 150
    means the row's steps do not draw fresh randomness (an engine that passed the same step
    to the sampler every time would repeat its first token 300 times)."""
    lm = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(initializer_range=0.3))
    with torch.no_grad():
        lm.lm_head.weight.zero_()
    engine = Engine(lm, None, max_batch_size=1, max_seq_len=320)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=300, temperature=1.0, seed=11,
                                                      ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 300
    assert len(set(out.token_ids)) > 150, len(set(out.token_ids))


def test_seeds_are_per_row_and_survive_batch_mates_slots_and_preemption():
    lm = random_model(PersimmonForCausalLM, PersimmonConfig.tiny(initializer_range=0.3))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (6, 14, 9, 20, 4)]
    row = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=77, ignore_eos=True)
    alone = Engine(lm, None, max_batch_size=1, max_seq_len=64).generate([prompts[1]], row)[0].token_ids
    others = [SamplingParams(max_new_tokens=24, temperature=0.9, seed=s, ignore_eos=True) for s in range(4)]
    crowd = Engine(lm, None, max_batch_size=5, max_seq_len=64).generate(prompts[2:] + [prompts[1]] + prompts[:1],
                                                                        others[:3] + [row] + others[3:])
    assert crowd[3].token_ids == alone
    per_token = 2 * lm.config.num_hidden_layers * lm.config.hidden_size * 4
    tight = Engine(lm, None, max_batch_size=5, max_seq_len=64, kv_block_size=4,
                   kv_cache_gib=(16 + 2) * 4 * per_token / 2**30)
    squeezed = tight.generate(prompts[:1] + [prompts[1]] + prompts[2:], others[:1] + [row] + others[1:])
    assert tight.stats()["preemptions"] > 0 and squeezed[1].token_ids == alone
    other_seed = Engine(lm, None, max_batch_size=1, max_seq_len=64).generate(
        [prompts[1]], SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95, seed=78, ignore_eos=True))[0]
    assert other_seed.token_ids != alone
