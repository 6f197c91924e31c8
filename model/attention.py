"""The paged KV cache and attention over it (the engine's forward; plain forwards never come here).

KV memory is one pool of fixed-size blocks allocated once from a budget (model/capacity.py):
`k`, `v` are [layers, num_blocks * block_size, heads, head_dim]; a token's keys live at slot
`block * block_size + offset`. A sequence's blocks (its block table, a row of the runner's
`block_tables`) come from the scheduler's BlockManager, so memory follows the tokens held, never
rows x max_seq_len. Block 0 is the null block: always zero, table padding.

An engine forward runs N tokens of several sequences side by side, described by the
`AttentionMetadata` the runner's backend builds. Per layer, `paged_attention` writes the new
keys and values into the pool; a sequence with nothing cached attends causally to its own keys
(SDPA); the others run the work their backend planned: `TorchBackend` (any device, CUDA
included until a fused kernel is written; the reference) gathers each row's blocks and runs SDPA
under a position mask, in groups whose gathered keys stay under `gather_tokens`;
`CpuKernelBackend` reads the pool in place with the C kernel (model/cpu_kernels.py) for short
query runs. A fixed-shape decode step (what CUDA graphs replay) plans from tensors only: block
tables and context lengths are graph inputs, padded rows read the null block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import cpu_kernels

KERNEL_MAX_QUERY = 16  # cached sequences with longer query runs use SDPA (GEMM-shaped) instead


class PagedKVCache:
    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype, device=None):
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
        """Zero whole blocks (all layers): a masked key the gather path reads is never a stale NaN/inf."""
        for pool in (self.k, self.v):
            self._blocks_view(pool).index_fill_(1, blocks, 0)

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [N, H, D] into slots slot_mapping [N]
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


def _causal_sdpa(q, k, v, scale):  # q, k, v [T, H, D] of one sequence -> [T, H, D]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True, scale=scale)
    return out.transpose(0, 1)


def gathered_attention(q, cache, layer, tables, query_pos, scale):
    """q [R, T, H, D], tables [R, nb], query_pos [R, T] -> [R, T, H, D], keys at positions <= the query's."""
    k, v = cache.gather(layer, tables)  # [R, nb * bs, H, D]
    keys = torch.arange(k.shape[1], device=q.device)
    mask = keys[None, None, None, :] <= query_pos[:, None, :, None]  # [R, 1, T, L]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@dataclass
class Gather:
    """Rows that gather their blocks: query tokens idx [R, T] at positions pos [R, T] see the keys
    of tables [R, nb] up to their own. Shorter rows repeat their last query (`valid`: the real ones)."""
    tables: torch.Tensor
    idx: torch.Tensor
    pos: torch.Tensor
    valid: torch.Tensor | None = None

    def __call__(self, q, cache, layer, scale, out):
        res = gathered_attention(q[self.idx], cache, layer, self.tables, self.pos, scale)  # [R, T, H, D]
        if self.valid is None:
            out.index_copy_(0, self.idx[:, 0], res[:, 0])
        else:
            out[self.idx[self.valid]] = res[self.valid]


@dataclass
class KernelRun:
    """Tokens idx that read the pool in place (CPU kernel), each its row's blocks up to its position."""
    idx: slice | torch.Tensor
    rows: torch.Tensor
    pos: torch.Tensor
    tables: torch.Tensor

    def __call__(self, q, cache, layer, scale, out):
        out[self.idx] = cpu_kernels.paged_attention(q[self.idx], cache.k[layer], cache.v[layer], self.tables,
                                                    self.rows, self.pos, cache.block_size, scale)


@dataclass
class AttentionMetadata:
    """How the N tokens of one engine forward map onto sequences and the KV pool (layers only read it)."""
    positions: torch.Tensor  # [N] long
    fresh: list[tuple[int, int]]  # token spans of sequences with nothing cached: causal within each
    cached: list[Gather | KernelRun] = field(default_factory=list)  # the sequences that read cached keys
    slot_mapping: torch.Tensor | None = None  # [N] pool slot of each token's k/v; None: nothing is cached
    rope_lens: torch.Tensor | None = None  # [N] dynamic NTK: the sequence length each token's rotary uses


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: PagedKVCache | None,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q, k, v [N, H, D] (rotary applied) -> attention output [N, H, D]."""
    if meta.slot_mapping is not None:
        cache.write(layer, meta.slot_mapping, k, v)
    if not meta.cached and len(meta.fresh) == 1:
        return _causal_sdpa(q, k, v, scale)  # one sequence, nothing cached
    out = torch.empty_like(q)
    for a, b in meta.fresh:
        out[a:b] = _causal_sdpa(q[a:b], k[a:b], v[a:b], scale)
    for work in meta.cached:
        work(q, cache, layer, scale, out)
    return out


class TorchBackend:
    """Attention over cached keys by gather + SDPA (the reference; runs on any device)."""

    name = "torch"

    def __init__(self, block_size: int, gather_tokens: int):
        self.block_size, self.gather_tokens = block_size, gather_tokens

    def metadata(self, positions, spans, context_lens, rows, token_rows, block_tables, slot_mapping,
                 rope_lens=None) -> AttentionMetadata:
        """Sequence i has tokens spans[i] = (a, b) of the N, sees context_lens[i] keys (cached +
        new) and owns rows[i] of block_tables; token_rows [N] is each token's row."""
        fresh = [i for i, ((a, b), n) in enumerate(zip(spans, context_lens)) if n == b - a]
        cached = [i for i, ((a, b), n) in enumerate(zip(spans, context_lens)) if n != b - a]
        work = self._plan(cached, positions, spans, context_lens, rows, token_rows, block_tables)
        return AttentionMetadata(positions, [spans[i] for i in fresh], work, slot_mapping, rope_lens)

    def _plan(self, seqs, positions, spans, context_lens, rows, token_rows, block_tables) -> list:
        """Gather groups of consecutive sequences while their gathered keys fit gather_tokens."""
        work, group, widest, device = [], [], 0, positions.device
        for i in seqs + [None]:
            nb = 0 if i is None else -(-context_lens[i] // self.block_size)
            if group and (i is None or (len(group) + 1) * max(widest, nb) * self.block_size > self.gather_tokens):
                tables = block_tables.index_select(0, torch.tensor([rows[g] for g in group], device=device))[:, :widest]
                lengths = [spans[g][1] - spans[g][0] for g in group]
                T = max(lengths)  # padding repeats a row's last query; its output is dropped
                idx = torch.tensor([[a + min(t, b - a - 1) for t in range(T)] for a, b in (spans[g] for g in group)],
                                   device=device)
                valid = None if T == 1 else torch.tensor([[t < n for t in range(T)] for n in lengths], device=device)
                work.append(Gather(tables, idx, positions[idx], valid))
                group, widest = [], 0
            if i is not None:
                group.append(i)
                widest = max(widest, nb)
        return work

    def static_metadata(self, positions, slot_mapping, tables, lens) -> AttentionMetadata:
        """One query per row: tables [S, nb], lengths lens [S]; tensor ops only (CUDA-graph replayable)."""
        S, nb = tables.shape
        chunk = max(1, self.gather_tokens // (nb * self.block_size))
        idx = torch.arange(S, device=tables.device)[:, None]
        work = [Gather(tables[a:a + chunk], idx[a:a + chunk], (lens[a:a + chunk] - 1)[:, None])
                for a in range(0, S, chunk)]
        return AttentionMetadata(positions, [], work, slot_mapping)


class CpuKernelBackend(TorchBackend):
    """Short query runs read the pool in place through the C kernel; the rest gather."""

    name = "cpu_kernel"

    def _plan(self, seqs, positions, spans, context_lens, rows, token_rows, block_tables) -> list:
        short = [i for i in seqs if spans[i][1] - spans[i][0] <= KERNEL_MAX_QUERY]
        long = [i for i in seqs if spans[i][1] - spans[i][0] > KERNEL_MAX_QUERY]
        work = super()._plan(long, positions, spans, context_lens, rows, token_rows, block_tables)
        if short:
            first, last = spans[short[0]][0], spans[short[-1]][1]
            idx = slice(first, last)  # their tokens, when contiguous
            if sum(spans[i][1] - spans[i][0] for i in short) != last - first:
                idx = torch.cat([torch.arange(*spans[i], device=positions.device) for i in short])
            work.insert(0, KernelRun(idx, token_rows[idx], positions[idx], block_tables))
        return work


def attention_backend(device: torch.device, dtype: torch.dtype, block_size: int, gather_tokens: int) -> TorchBackend:
    """The model runner's pick: on CPU the C kernel where it builds for this dtype, else gather +
    SDPA (on CUDA: the slot for a fused paged kernel reading blocks in place, as the CPU one does)."""
    if device.type == "cpu" and cpu_kernels.available(dtype):
        return CpuKernelBackend(block_size, gather_tokens)
    return TorchBackend(block_size, gather_tokens)
