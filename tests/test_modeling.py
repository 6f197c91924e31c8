"""Our Persimmon vs transformers' Persimmon: logits, losses and heads to fp32 tolerance."""

import pytest
import torch
from conftest import hf_twin, random_model
from tolerances import assert_forward_close, forward_tol, no_less_precise

from model import (
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonModel,
)


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
    assert_forward_close(a, b, config)


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
        assert_forward_close(a[real], b[real], config)
    # with positions from the mask, a left-padded row equals the same row unpadded
    with torch.no_grad():
        padded = ours(x, attention_mask=mask, position_ids=position_ids).logits[0, 5:]
        alone = ours(x[:1, 5:]).logits[0]
    assert_forward_close(padded, alone, config)


def test_causal_lm_loss_matches_transformers():
    config = PersimmonConfig.tiny()
    ours = random_model(PersimmonForCausalLM, config)
    ref = hf_twin(ours)
    x = ids(2, 10)
    labels = x.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        a, b = ours(x, labels=labels).loss, ref(x, labels=labels).loss
    assert abs(a.item() - b.item()) <= forward_tol(config, torch.float32, 64, b.item())


def test_logits_to_keep_is_the_tail_of_full_logits():
    ours = random_model(PersimmonForCausalLM, PersimmonConfig.tiny())
    x = ids(2, 9)
    with torch.no_grad():
        full, tail = ours(x).logits, ours(x, logits_to_keep=1).logits
    assert tail.shape == (2, 1, 512)
    assert_forward_close(full[:, -1:], tail, ours.config)


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
    assert_forward_close(a.logits, b.logits, ours.config)
    assert abs(a.loss.item() - b.loss.item()) <= forward_tol(config, torch.float32, 64, b.loss.item())


def test_sequence_classification_pools_last_real_token():
    config = PersimmonConfig.tiny(pad_token_id=0)
    ours = random_model(PersimmonForSequenceClassification, config)
    x, mask = padded_batch(0, "right")
    with torch.no_grad():
        batched = ours(x, attention_mask=mask).logits
        alone = ours(x[1:2, :6]).logits
    assert_forward_close(batched[1], alone[0], config)


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
    assert_forward_close(a.logits[real], b.logits[real], config)
    assert abs(a.loss.item() - b.loss.item()) <= forward_tol(config, torch.float32, 64, b.loss.item())


def test_bare_model_hidden_states_match_transformers():
    ours = random_model(PersimmonModel, PersimmonConfig.tiny())
    ref = hf_twin(ours)
    x = ids(2, 8)
    with torch.no_grad():
        a, b = ours(x), ref(x).last_hidden_state
    assert_forward_close(a, b, ours.config)


def test_bfloat16_close_to_transformers_bfloat16():
    exact = random_model(PersimmonForCausalLM, PersimmonConfig.tiny())
    ours = random_model(PersimmonForCausalLM, PersimmonConfig.tiny()).to(torch.bfloat16)
    ref = hf_twin(ours)
    x = ids(2, 16)
    with torch.no_grad():
        a, b, c = ours(x).logits.float(), ref(x).logits.float(), exact(x).logits
    assert a.dtype == torch.float32 and not a.isnan().any()
    no_less_precise(a, b, c)  # as close to fp32 as transformers in bf16 (tests/tolerances.py)


def test_dropout_off_in_eval_and_training_mode_differs():
    config = PersimmonConfig.tiny(hidden_dropout=0.6)
    ours = random_model(PersimmonForCausalLM, config)
    x = ids(1, 8)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ours(x).logits)
        ours.train()
        torch.manual_seed(0)
        assert not torch.allclose(ours(x).logits, ours.eval()(x).logits)


def engine_metadata(seqs, block_tables, block_size, use_kernel):
    """AttentionMetadata for sequences given as (row in block_tables, first position, n new tokens),
    built as the model runner builds it, by the CPU-kernel or the torch backend."""
    from model.attention import CpuKernelBackend, TorchBackend

    positions, spans, ctx, rows, n = [], [], [], [], 0
    for row, start, count in seqs:
        positions += range(start, start + count)
        spans.append((n, n + count))
        ctx.append(start + count)
        rows.append(row)
        n += count
    positions = torch.tensor(positions)
    token_rows = torch.repeat_interleave(torch.tensor(rows), torch.tensor([c for _, _, c in seqs]))
    slots = block_tables[token_rows, positions // block_size] * block_size + positions % block_size
    backend = (CpuKernelBackend if use_kernel else TorchBackend)(block_size, gather_tokens=32768)
    return backend.metadata(positions, spans, ctx, rows, token_rows, block_tables, slots)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu-kernel", "gather-sdpa"])
def test_paged_cached_forward_equals_full_forward(use_kernel):
    """Prompts of different lengths prefilled into scattered KV blocks, then decoded token by
    token as one ragged batch (and one row continuing with a multi-token chunk): every
    position's logits equal the full forward's."""
    from model import cpu_kernels
    from model.attention import PagedKVCache

    if use_kernel and not cpu_kernels.available(torch.float32):
        pytest.skip("the CPU kernel could not be built here (no C compiler); the gather path is tested")
    config = PersimmonConfig.tiny()
    ours = random_model(PersimmonForCausalLM, config)
    bs, lengths, total = 4, [3, 9, 14, 6], 22
    seqs = [ids(1, total, seed=i)[0] for i in range(len(lengths))]
    cache = PagedKVCache(config, num_blocks=40, block_size=bs, dtype=torch.float32)
    order = torch.randperm(38, generator=torch.Generator().manual_seed(0)) + 2  # scattered blocks
    tables = order[:4 * 6].view(4, 6).contiguous()
    cache.zero_blocks(tables.flatten())  # as the runner does with every block it hands out
    lm = ours.lm_head
    with torch.no_grad():
        full = [ours(s[None]).logits[0] for s in seqs]
        meta = engine_metadata([(r, 0, n) for r, n in enumerate(lengths)], tables, bs, use_kernel)
        h = ours.model(torch.cat([s[:n] for s, n in zip(seqs, lengths)]), attn_metadata=meta, kv_cache=cache)
        at = 0
        for s, n, f in zip(seqs, lengths, full):
            assert_forward_close(lm(h[at:at + n]), f[:n], config)
            at += n
        pos = list(lengths)
        for _ in range(5):  # ragged decode: one token per row
            meta = engine_metadata([(r, p, 1) for r, p in enumerate(pos)], tables, bs, use_kernel)
            h = ours.model(torch.stack([s[p] for s, p in zip(seqs, pos)]), attn_metadata=meta, kv_cache=cache)
            for r, (p, f) in enumerate(zip(pos, full)):
                assert_forward_close(lm(h[r]), f[p], config)
            pos = [p + 1 for p in pos]
        # row 1 continues with 4 tokens at once after its cached ones (a prefill chunk / recompute)
        meta = engine_metadata([(0, pos[0], 1), (1, pos[1], 4)], tables, bs, use_kernel)
        h = ours.model(torch.cat([seqs[0][pos[0]:pos[0] + 1], seqs[1][pos[1]:pos[1] + 4]]), attn_metadata=meta,
                       kv_cache=cache)
        assert_forward_close(lm(h[0]), full[0][pos[0]], config)
        assert_forward_close(lm(h[1:]), full[1][pos[1]:pos[1] + 4], config)


def test_packed_rows_without_cache_equal_separate_forwards():
    """Rows side by side in one flat input with no cache (classification), each attending only
    to itself."""
    from model.attention import AttentionMetadata

    ours = random_model(PersimmonForCausalLM, PersimmonConfig.tiny())
    rows = [ids(1, n, seed=n)[0] for n in (5, 11, 3)]
    ends = [5, 16, 19]
    meta = AttentionMetadata(positions=torch.cat([torch.arange(len(r)) for r in rows]),
                             fresh=list(zip([0] + ends[:-1], ends)))
    with torch.no_grad():
        out = ours.lm_head(ours.model(torch.cat(rows), attn_metadata=meta))
        for r, a, b in zip(rows, [0] + ends[:-1], ends):
            assert_forward_close(out[a:b], ours(r[None]).logits[0], ours.config)
