"""Our Persimmon vs transformers' Persimmon: logits, losses and heads to fp32 tolerance."""

import pytest
import torch
from conftest import hf_twin, random_model

from model import (
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonModel,
)

TOL = 1e-4

CONFIGS = {
    "tiny-defaults": {},
    "no-qk-layernorm": {"qk_layernorm": False},
    "full-rotary": {"partial_rotary_factor": 1.0},
    "quarter-rotary": {"partial_rotary_factor": 0.25, "hidden_size": 128},
    "rope-linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    "rope-dynamic": {"rope_scaling": {"rope_type": "dynamic", "factor": 3.0}, "max_position_embeddings": 16},
    "tied": {"tie_word_embeddings": True},
    "three-layers-8-heads": {"num_hidden_layers": 3, "num_attention_heads": 8, "hidden_size": 128},
}


def ids(batch, length, vocab=512, seed=0):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_causal_lm_logits_match_transformers(name):
    config = PersimmonConfig.tiny(**CONFIGS[name])
    ours = random_model(PersimmonForCausalLM, config)
    ref = hf_twin(ours)
    # 40 tokens run past max_position_embeddings=16 in the dynamic case: NTK rescaling kicks in
    x = ids(2, 40)
    with torch.no_grad():
        a, b = ours(x).logits, ref(x).logits
    assert a.shape == b.shape == (2, 40, config.vocab_size)
    assert (a - b).abs().max().item() <= TOL


def test_dynamic_rope_changes_past_max_positions():
    """The dynamic case above must actually exercise rescaling: short inputs equal the unscaled
    model, long inputs differ from it."""
    base = PersimmonConfig.tiny(max_position_embeddings=16)
    dyn = PersimmonConfig.tiny(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 3.0})
    a = random_model(PersimmonForCausalLM, base)
    b = PersimmonForCausalLM(dyn).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        short, long = ids(1, 16), ids(1, 40)
        assert torch.equal(a(short).logits, b(short).logits)
        assert (a(long).logits - b(long).logits).abs().max() > 1e-3


def test_left_padded_batch_with_mask_and_positions():
    config = PersimmonConfig.tiny()
    ours = random_model(PersimmonForCausalLM, config)
    ref = hf_twin(ours)
    x = ids(3, 12)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    mask[1, :2] = 0
    x = x.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    for pos in (None, position_ids):
        with torch.no_grad():
            a = ours(x, attention_mask=mask, position_ids=pos).logits
            b = ref(x, attention_mask=mask, position_ids=pos).logits
        assert not a.isnan().any()
        real = mask.bool()
        assert (a[real] - b[real]).abs().max().item() <= TOL
    # with positions from the mask, a left-padded row equals the same row unpadded
    with torch.no_grad():
        padded = ours(x, attention_mask=mask, position_ids=position_ids).logits[0, 5:]
        alone = ours(x[:1, 5:]).logits[0]
    assert (padded - alone).abs().max().item() <= TOL


def test_causal_lm_loss_matches_transformers():
    config = PersimmonConfig.tiny()
    ours = random_model(PersimmonForCausalLM, config)
    ref = hf_twin(ours)
    x = ids(2, 10)
    labels = x.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        a, b = ours(x, labels=labels).loss, ref(x, labels=labels).loss
    assert abs(a.item() - b.item()) <= 1e-5


def test_logits_to_keep_is_the_tail_of_full_logits():
    ours = random_model(PersimmonForCausalLM, PersimmonConfig.tiny())
    x = ids(2, 9)
    with torch.no_grad():
        full, tail = ours(x).logits, ours(x, logits_to_keep=1).logits
    assert tail.shape == (2, 1, 512)
    assert torch.allclose(full[:, -1:], tail, atol=1e-6)


def padded_batch(pad_id, side):
    x = ids(3, 11)
    lengths = [11, 6, 3]
    mask = torch.zeros_like(x)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, 11 - n:] = 1
    return x.masked_fill(mask == 0, pad_id), mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("problem", ["single_label_classification", "multi_label_classification", "regression"])
def test_sequence_classification_matches_transformers(side, problem):
    num_labels = 1 if problem == "regression" else 3
    config = PersimmonConfig.tiny(pad_token_id=0, num_labels=num_labels, problem_type=problem)
    ours = random_model(PersimmonForSequenceClassification, config)
    ref = hf_twin(ours)
    x, mask = padded_batch(0, side)
    if problem == "single_label_classification":
        labels = torch.tensor([0, 2, 1])
    elif problem == "multi_label_classification":
        labels = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.float)
    else:
        labels = torch.tensor([0.5, -1.0, 2.0])
    with torch.no_grad():
        a = ours(x, attention_mask=mask, labels=labels)
        b = ref(x, attention_mask=mask, labels=labels)
    assert a.logits.shape == (3, num_labels)
    assert (a.logits - b.logits).abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_sequence_classification_pools_last_real_token():
    config = PersimmonConfig.tiny(pad_token_id=0)
    ours = random_model(PersimmonForSequenceClassification, config)
    x, mask = padded_batch(0, "right")
    with torch.no_grad():
        batched = ours(x, attention_mask=mask).logits
        alone = ours(x[1:2, :6]).logits
    assert (batched[1] - alone[0]).abs().max().item() <= TOL


def test_sequence_classification_without_pad_id_rejects_batches():
    ours = random_model(PersimmonForSequenceClassification, PersimmonConfig.tiny())
    with pytest.raises(ValueError, match="pad_token_id"):
        ours(ids(2, 5))
    assert ours(ids(1, 5)).logits.shape == (1, 2)


def test_token_classification_matches_transformers():
    config = PersimmonConfig.tiny(num_labels=5, pad_token_id=0)
    ours = random_model(PersimmonForTokenClassification, config)
    ref = hf_twin(ours)
    x, mask = padded_batch(0, "right")
    labels = torch.randint(0, 5, x.shape, generator=torch.Generator().manual_seed(3))
    labels[mask == 0] = -100
    with torch.no_grad():
        a = ours(x, attention_mask=mask, labels=labels)
        b = ref(x, attention_mask=mask, labels=labels)
    assert a.logits.shape == (3, 11, 5)
    real = mask.bool()
    assert (a.logits[real] - b.logits[real]).abs().max().item() <= TOL
    assert abs(a.loss.item() - b.loss.item()) <= 1e-5


def test_bare_model_hidden_states_match_transformers():
    ours = random_model(PersimmonModel, PersimmonConfig.tiny())
    ref = hf_twin(ours)
    x = ids(2, 8)
    with torch.no_grad():
        a, b = ours(x), ref(x).last_hidden_state
    assert (a - b).abs().max().item() <= TOL


def test_bfloat16_close_to_transformers_bfloat16():
    ours = random_model(PersimmonForCausalLM, PersimmonConfig.tiny()).to(torch.bfloat16)
    ref = hf_twin(ours)
    x = ids(2, 16)
    with torch.no_grad():
        a, b = ours(x).logits.float(), ref(x).logits.float()
    assert a.dtype == torch.float32 and not a.isnan().any()
    assert (a - b).abs().max().item() <= 2e-2


def test_dropout_off_in_eval_and_training_mode_differs():
    config = PersimmonConfig.tiny(hidden_dropout=0.6)
    ours = random_model(PersimmonForCausalLM, config)
    x = ids(1, 8)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ours(x).logits)
        ours.train()
        torch.manual_seed(0)
        assert not torch.allclose(ours(x).logits, ours.eval()(x).logits)


def test_cached_forward_equals_full_forward():
    """Prefill a prompt into a cache slot, then decode token by token: every step's logits equal
    the full forward's logits at that position."""
    from model import KVCache

    config = PersimmonConfig.tiny()
    ours = random_model(PersimmonForCausalLM, config)
    x = ids(2, 12)
    cache = KVCache(config, max_batch_size=4, max_seq_len=32, dtype=torch.float32)
    with torch.no_grad():
        full = ours(x).logits
        slots = torch.tensor([3, 1])  # arbitrary, non-contiguous cache rows
        pos = torch.arange(7).expand(2, 7)
        pre = ours(x[:, :7], position_ids=pos, kv_cache=cache, cache_slots=slots).logits
        assert (pre - full[:, :7]).abs().max().item() <= TOL
        for t in range(7, 12):
            step = ours(x[:, t:t + 1], position_ids=torch.full((2, 1), t), kv_cache=cache,
                        cache_slots=slots).logits
            assert (step[:, 0] - full[:, t]).abs().max().item() <= TOL


def test_packed_segments_equal_separate_forwards():
    """Prompts side by side in one [1, N] input, each attending only to itself."""
    ours = random_model(PersimmonForCausalLM, PersimmonConfig.tiny())
    rows = [ids(1, n, seed=n)[0] for n in (5, 11, 3)]
    packed = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    ends = [5, 16, 19]
    with torch.no_grad():
        out = ours(packed, position_ids=positions, segments=list(zip([0] + ends[:-1], ends))).logits[0]
        for r, a, b in zip(rows, [0] + ends[:-1], ends):
            assert (out[a:b] - ours(r[None]).logits[0]).abs().max().item() <= TOL


def test_decode_with_kv_chunks_equals_full_forward():
    """Ragged decode batch: runs of rows attending over their own key lengths (kv_chunks) give
    each row the logits of its own full forward."""
    from model import KVCache

    config = PersimmonConfig.tiny()
    ours = random_model(PersimmonForCausalLM, config)
    lengths = [3, 5, 9, 14, 20]
    seqs = [ids(1, n + 1, seed=i)[0] for i, n in enumerate(lengths)]
    cache = KVCache(config, max_batch_size=5, max_seq_len=32, dtype=torch.float32)
    with torch.no_grad():
        for slot, (seq, n) in enumerate(zip(seqs, lengths)):  # prompt of n tokens into its own slot
            ours(seq[None, :n], position_ids=torch.arange(n)[None], kv_cache=cache, cache_slots=torch.tensor([slot]))
        step = ours(torch.stack([s[n] for s, n in zip(seqs, lengths)])[:, None],
                    position_ids=torch.tensor(lengths)[:, None], kv_cache=cache, cache_slots=slice(0, 5),
                    kv_chunks=[(0, 2, 6), (2, 3, 10), (3, 5, 21)]).logits[:, 0]
        for row, (seq, n) in enumerate(zip(seqs, lengths)):
            assert (step[row] - ours(seq[None, :n + 1]).logits[0, n]).abs().max().item() <= TOL
