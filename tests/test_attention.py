"""Attention over the paged KV cache: the native CPU kernel and the gather + SDPA path against a
plain SDPA over each sequence's own keys (the reference), on scattered block tables."""

import pytest
import torch
import torch.nn.functional as F
from tolerances import attention_tol

from model import cpu_kernels
from model.attention import PagedKVCache
from model.config import PersimmonConfig

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(torch.float32),
                                  reason="the CPU kernel could not be built here (no C compiler)")


def scattered_pool(dtype, lengths, bs=4, heads=4, head_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = PersimmonConfig.tiny(hidden_size=heads * head_dim, num_attention_heads=heads, num_hidden_layers=1)
    nb = [-(-n // bs) for n in lengths]
    cache = PagedKVCache(config, num_blocks=sum(nb) + 5, block_size=bs, dtype=dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(dtype))
    order = (torch.randperm(sum(nb) + 3, generator=g) + 2).tolist()  # never the null / scratch block
    tables = torch.zeros(len(lengths), max(nb), dtype=torch.long)
    for r, n in enumerate(nb):
        tables[r, :n] = torch.tensor(order[:n])
        order = order[n:]
    return cache, tables


def reference(q, cache, tables, row, pos, scale):
    """q [H, D] attending to positions 0..pos of the row, keys read one by one."""
    bs = cache.block_size
    slots = [int(tables[row, p // bs]) * bs + p % bs for p in range(pos + 1)]
    k, v = cache.k[0][slots].float(), cache.v[0][slots].float()  # [n, H, D]
    out = F.scaled_dot_product_attention(q.float()[:, None], k.transpose(0, 1), v.transpose(0, 1), scale=scale)
    return out[:, 0]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_equals_reference(dtype):
    if not cpu_kernels.available(dtype):
        pytest.skip(f"this compiler has no {dtype} type for the kernel")
    lengths = [1, 5, 16, 17, 63, 200]
    cache, tables = scattered_pool(dtype, lengths)
    # several query tokens per row (a short prefill after a cached prefix), at various positions
    rows, positions = [], []
    for r, n in enumerate(lengths):
        for p in sorted({n - 1, max(0, n - 3), n // 2}):
            rows.append(r)
            positions.append(p)
    q = torch.randn(len(rows), 4, 16).to(dtype)
    scale = 16 ** -0.5
    out = cpu_kernels.paged_attention(q, cache.k[0], cache.v[0], tables, torch.tensor(rows), torch.tensor(positions),
                                      cache.block_size, scale)
    assert out.dtype == dtype and out.shape == q.shape
    for t, (r, p) in enumerate(zip(rows, positions)):
        ref = reference(q[t], cache, tables, r, p, scale)
        tol = attention_tol(dtype, 16, p + 1, ref.abs().max().item())
        assert (out[t].float() - ref).abs().max().item() <= tol


@needs_kernel
def test_cpu_kernel_strided_queries_and_many_threads():
    cache, tables = scattered_pool(torch.float32, [40, 7, 90])
    qkv = torch.randn(3, 4, 3, 16)  # [N, H, 3, D] as the fused projection lays q out: strided
    q = qkv[:, :, 0]
    assert not q.is_contiguous()
    positions = torch.tensor([39, 6, 89])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        out = cpu_kernels.paged_attention(q, cache.k[0], cache.v[0], tables, torch.arange(3), positions, 4, 0.25)
    finally:
        torch.set_num_threads(before)
    for t in range(3):
        ref = reference(q[t], cache, tables, t, int(positions[t]), 0.25)
        tol = attention_tol(torch.float32, 16, int(positions[t]) + 1, ref.abs().max().item())
        assert (out[t] - ref).abs().max().item() <= tol


def test_gather_path_equals_reference():
    from model.attention import gathered_attention

    lengths = [3, 17, 40]
    cache, tables = scattered_pool(torch.float32, lengths)
    q = torch.randn(3, 2, 4, 16)  # [R, T, H, D]: two query tokens per row
    pos = torch.tensor([[1, 2], [15, 16], [38, 39]])
    out = gathered_attention(q, cache, 0, tables, pos, 0.25)
    for r in range(3):
        for t in range(2):
            ref = reference(q[r, t], cache, tables, r, int(pos[r, t]), 0.25)
            tol = attention_tol(torch.float32, 16, int(pos[r, t]) + 1, ref.abs().max().item())
            assert (out[r, t] - ref).abs().max().item() <= tol


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PERSIMMON_CPU_KERNELS", "0")
    assert cpu_kernels._load() is None


def test_kernel_build_failure_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("PERSIMMON_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "FLAGS", ["--no-such-flag-for-any-compiler"])
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler: nothing to fail")
    assert cpu_kernels._load() is None
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_null_block_is_zero_and_new_blocks_are_zeroed():
    config = PersimmonConfig.tiny(hidden_size=64, num_attention_heads=4, num_hidden_layers=1)
    cache = PagedKVCache(config, num_blocks=6, block_size=4, dtype=torch.float32)
    assert torch.count_nonzero(cache.k[:, :4]) == 0 and torch.count_nonzero(cache.v[:, :4]) == 0  # null block
    cache.k.fill_(float("nan"))
    cache.zero_blocks(torch.tensor([3]))
    view = cache.k.view(1, -1, cache.block_size, 4, 16)
    assert torch.count_nonzero(view[:, 3]) == 0 and torch.isnan(view[:, 2]).all()
