"""The paged KV cache and attention over it (the engine's forward; plain forwards never come here).

KV memory is one pool of fixed-size blocks allocated once from a budget (model/capacity.py):
`k`, `v` are [layers, num_blocks * block_size, heads, head_dim], and a token's keys live at
slot `block * block_size + offset`. A sequence owns a list of blocks (its block table, a row of
the runner's `block_tables`); blocks are handed out and reclaimed by the scheduler's
BlockManager, so memory follows the tokens actually held, never rows x max_seq_len.
Block 0 is the null block: always zero, the padding of block tables.

One forward of the engine runs N tokens of several sequences side by side (packed, no
padding), described by an `AttentionMetadata`: each sequence's span of the N tokens and how
many keys its last token sees (`context_lens`; cached + new). Per layer, `paged_attention`
writes the new keys and values into the pool, then:
- a sequence with nothing cached yet (a prompt's first prefill) attends causally to its own
  fresh keys with SDPA, no cache read;
- a sequence with cached keys (decode, a prompt after a shared prefix, a preempted row being
  recomputed) attends over its blocks: on CPU with the native kernel (model/cpu_kernels.py)
  read in place for short query runs, otherwise by gathering its blocks and calling SDPA
  with a position mask, in chunks of rows whose gathered size stays under GATHER_TOKENS.
`static` metadata (fixed shapes, what CUDA graphs replay) takes the gather path with tensors
only: block tables and context lengths are graph inputs, padded rows read the null block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .capacity import GATHER_TOKENS

KERNEL_MAX_QUERY = 16  # cached sequences with longer query runs use SDPA (GEMM-shaped) instead


class PagedKVCache:
    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype, device=None):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        shape = (config.num_hidden_layers, num_blocks * block_size, config.num_attention_heads, config.head_dim)
        # torch.empty: on CPU pages are committed only when first written, so RSS follows use
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.zero_blocks(torch.zeros(1, dtype=torch.long, device=device))  # the null block

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _blocks_view(self, pool: torch.Tensor) -> torch.Tensor:  # [L, num_blocks, block_size, H, D]
        return pool.view(pool.shape[0], self.num_blocks, self.block_size, *pool.shape[2:])

    def zero_blocks(self, blocks: torch.Tensor) -> None:
        """Zero whole blocks (all layers). Newly handed-out blocks are zeroed so a masked key
        read by the gather path is never stale NaN/inf from an earlier row."""
        for pool in (self.k, self.v):
            self._blocks_view(pool).index_fill_(1, blocks, 0)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy blocks src[i] -> dst[i] in every layer (copy-on-write of a shared partial block)."""
        for pool in (self.k, self.v):
            view = self._blocks_view(pool)
            view[:, dst] = view[:, src]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, H, D] into slots slot_mapping [N]."""
        self.k[layer].index_copy_(0, slot_mapping, k)
        self.v[layer].index_copy_(0, slot_mapping, v)

    def gather(self, layer: int, tables: torch.Tensor):
        """Keys and values of the blocks `tables` [R, nb] names: two [R, nb * block_size, H, D]."""
        R, nb = tables.shape
        out = []
        for pool in (self.k, self.v):
            blocks = self._blocks_view(pool)[layer]  # [num_blocks, bs, H, D]
            out.append(blocks.index_select(0, tables.reshape(-1)).view(R, nb * self.block_size, *pool.shape[2:]))
        return out


@dataclass
class AttentionMetadata:
    """How the N tokens of one engine forward map onto sequences and the KV pool.

    Sequence i owns tokens spans[i] = (a, b) of the N, at positions context_lens[i] - (b - a)
    ... context_lens[i] - 1; positions are also given per token. With `slot_mapping` None nothing
    is cached (classification: packed rows attending to themselves only).
    """
    positions: torch.Tensor  # [N] long
    spans: list  # [(a, b)] per sequence
    context_lens: list  # per sequence: keys its last token sees, cached + new
    slot_mapping: torch.Tensor | None = None  # [N] long: pool slot of each token's k/v
    block_tables: torch.Tensor | None = None  # [R, max_blocks] long (static: [S, nb], one row per sequence)
    seq_rows: list | None = None  # per sequence: its row in block_tables
    token_rows: torch.Tensor | None = None  # [N] long: each token's row in block_tables (CPU kernel)
    rope_lens: torch.Tensor | None = None  # [N] dynamic NTK: the sequence length each token's rotary uses
    use_kernel: bool = False  # CPU paged-attention kernel for cached sequences with short query runs
    static: bool = False  # fixed-shape decode (one token per sequence): see static_lens
    static_lens: torch.Tensor | None = None  # [S] long context lengths, static mode
    _plan: object = field(default=None, repr=False)  # built by the first layer, reused by the rest


def _causal_sdpa(q, k, v, scale):  # q, k, v [T, H, D] of one sequence -> [T, H, D]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


def _gathered_attention(q, cache, layer, tables, query_pos, scale):
    """q [R, T, H, D], tables [R, nb], query_pos [R, T]: each query sees the keys of its row's
    blocks at positions <= its own. Returns [R, T, H, D]."""
    k, v = cache.gather(layer, tables)  # [R, nb * bs, H, D]
    keys = torch.arange(k.shape[1], device=q.device)
    mask = keys[None, None, None, :] <= query_pos[:, None, :, None]  # [R, 1, T, L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@dataclass
class _Plan:
    """Which attention path each sequence of a forward takes; built once, used by every layer."""
    fresh: list  # spans with nothing cached
    kernel: tuple | None  # (token index, table rows [n], positions [n]) for the CPU kernel
    gather: list  # (tables [R, nb], token index [R, T], positions [R, T], valid [R, T] or None)


def _make_plan(meta: AttentionMetadata, block_size: int, device) -> _Plan:
    fresh, kernel_seqs, gather_seqs = [], [], []
    for i, ((a, b), n) in enumerate(zip(meta.spans, meta.context_lens)):
        if n == b - a:
            fresh.append((a, b))
        elif meta.use_kernel and b - a <= KERNEL_MAX_QUERY:
            kernel_seqs.append(i)
        else:
            gather_seqs.append(i)
    kernel = None
    if kernel_seqs:
        idx = _token_index(meta.spans, kernel_seqs, device)
        kernel = (idx, meta.token_rows[idx], meta.positions[idx])
    gather = []
    group: list[int] = []
    widest = 0
    for i in gather_seqs + [None]:  # consecutive rows while their gathered keys fit GATHER_TOKENS
        nb = 0 if i is None else -(-meta.context_lens[i] // block_size)
        if group and (i is None or (len(group) + 1) * max(widest, nb) * block_size > GATHER_TOKENS):
            gather.append(_gather_group(meta, group, widest, device))
            group, widest = [], 0
        if i is not None:
            group.append(i)
            widest = max(widest, nb)
    return _Plan(fresh, kernel, gather)


def _gather_group(meta, group, nb, device):
    rows = torch.tensor([meta.seq_rows[i] for i in group], device=device)
    tables = meta.block_tables.index_select(0, rows)[:, :nb]
    lengths = [meta.spans[i][1] - meta.spans[i][0] for i in group]
    if max(lengths) == 1:  # decode: one query per row, no padding
        idx = torch.tensor([meta.spans[i][0] for i in group], device=device)[:, None]
        return tables, idx, meta.positions[idx], None
    T = max(lengths)
    idx = torch.tensor([[a + min(t, b - a - 1) for t in range(T)] for a, b in (meta.spans[i] for i in group)],
                       device=device)  # padding repeats a row's last query; its output is dropped
    valid = torch.tensor([[t < n for t in range(T)] for n in lengths], device=device)
    return tables, idx, meta.positions[idx], valid


def _token_index(spans, seqs, device):
    """Token indices of the given sequences: a slice when they are contiguous."""
    first, last = spans[seqs[0]][0], spans[seqs[-1]][1]
    if sum(spans[i][1] - spans[i][0] for i in seqs) == last - first:
        return slice(first, last)
    return torch.cat([torch.arange(*spans[i], device=device) for i in seqs])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: PagedKVCache | None,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q, k, v [N, H, D] (rotary applied) -> attention output [N, H, D]."""
    if cache is not None and meta.slot_mapping is not None:
        cache.write(layer, meta.slot_mapping, k, v)
    if meta.static:
        return _static_decode(q, cache, layer, meta, scale)
    if meta._plan is None:
        meta._plan = _make_plan(meta, cache.block_size if cache is not None else 1, q.device)
    plan = meta._plan
    if not plan.kernel and not plan.gather and len(plan.fresh) == 1:
        return _causal_sdpa(q, k, v, scale)  # one sequence, nothing cached
    out = torch.empty_like(q)
    for a, b in plan.fresh:
        out[a:b] = _causal_sdpa(q[a:b], k[a:b], v[a:b], scale)
    if plan.kernel is not None:
        idx, rows, pos = plan.kernel
        out[idx] = cpu_kernels.paged_attention(q[idx], cache.k[layer], cache.v[layer], meta.block_tables, rows, pos,
                                               cache.block_size, scale)
    for tables, idx, pos, valid in plan.gather:
        res = _gathered_attention(q[idx], cache, layer, tables, pos, scale)  # [R, T, H, D]
        if valid is None:
            out.index_copy_(0, idx[:, 0], res[:, 0])
        else:
            out[idx[valid]] = res[valid]
    return out


def _static_decode(q, cache, layer, meta, scale):
    """Fixed shapes: S sequences, one query token each, block tables [S, nb]; tensor ops only,
    no host sync, so a CUDA graph can replay it. Rows in chunks that keep each gather under
    GATHER_TOKENS."""
    S, nb = meta.block_tables.shape
    chunk = max(1, GATHER_TOKENS // (nb * cache.block_size))
    outs = []
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        res = _gathered_attention(q[a:b, None], cache, layer, meta.block_tables[a:b],
                                  (meta.static_lens[a:b] - 1)[:, None], scale)
        outs.append(res[:, 0])
    return torch.cat(outs) if len(outs) > 1 else outs[0]
