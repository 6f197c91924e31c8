"""The model runner: owns the weights, the paged KV pool, the block-table tensor and CUDA graphs,
and runs every forward the engine makes (it checks the engine's sizing arguments).

`execute(step)` runs a scheduled step (model/scheduler.py) as one flat sequence of every row's
new tokens, returning hidden states only where a token is sampled or a choice scored, so the
262k-vocab head never sees [rows, tokens, vocab]; `forward_packed(rows)` runs whole rows with
no cache (classification). Decode-only steps on CUDA replay CUDA graphs (`"cuda_graph"`;
`"static"`: the same step run eagerly): batch and table width padded to buckets, block tables and
context lengths as graph inputs, padded rows reading the null block and writing the scratch block.
On CPUs where oneDNN runs the dtype, Linears run with packed weights (model/cpu_packing.py). The
KV pool is sized once from `kv_cache_gib` or the memory budget (model/capacity.py), never from
max_batch_size x max_seq_len (that product only caps it).
"""

from __future__ import annotations

import itertools
import logging

import torch

from . import capacity
from .attention import AttentionMetadata, PagedKVCache, attention_backend
from .cpu_packing import pack_cpu_linears
from .modeling import PersimmonForCausalLM
from .quantization import quantization_of
from .sampling_params import is_int, is_number
from .scheduler import MAX_NUM_SEQS, MAX_SEQ_LEN, RESERVED_BLOCKS, SCRATCH_BLOCK, ScheduledStep, cdiv

log = logging.getLogger(__name__)

DECODE_MODES = ("dynamic", "static", "cuda_graph")
MAX_GRAPHS = 48  # captured (batch bucket, table width) pairs; beyond this, static steps run eagerly


def _bucket(n: int, cap: int) -> int:
    return min(1 << max(n - 1, 0).bit_length(), cap)  # the next power of two


class ModelRunner:
    def __init__(self, model, *, max_batch_size: int, max_seq_len: int, prefill_token_budget: int,
                 block_size: int = 16, kv_cache_gib: float | None = None, memory_fraction: float = 0.9,
                 memory_share: float = 1.0, decode_mode: str | None = None, packed_cpu_linears: bool | None = None):
        self.model, self.config = model.eval(), model.config
        for name, value, low, high in (("max_batch_size", max_batch_size, 1, MAX_NUM_SEQS),
                                       ("prefill_token_budget", prefill_token_budget, 1, MAX_SEQ_LEN),
                                       ("kv_block_size", block_size, 1, 1024),
                                       ("max_seq_len", max_seq_len, 2, MAX_SEQ_LEN)):
            if not is_int(value) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if kv_cache_gib is not None and not (is_number(kv_cache_gib) and kv_cache_gib > 0):
            raise ValueError(f"kv_cache_gib must be a finite number of GiB > 0, got {kv_cache_gib!r}")
        for name, value in (("memory_fraction", memory_fraction), ("memory_share", memory_share)):
            if not (is_number(value) and 0 < value <= 1):
                raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
        if max_seq_len > self.config.max_position_embeddings and self.config.rope_type == "default":
            log.warning("max_seq_len=%d is past the model's max_position_embeddings=%d: positions beyond it "
                        "were never trained", max_seq_len, self.config.max_position_embeddings)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch_size, self.max_seq_len, self.block_size = max_batch_size, max_seq_len, block_size
        self.prefill_token_budget = prefill_token_budget
        self.packed = pack_cpu_linears(model, packed_cpu_linears)
        self.dynamic_rope = self.config.rope_type == "dynamic"
        self.kv_cache: PagedKVCache | None = None
        self.num_blocks = 0
        if isinstance(model, PersimmonForCausalLM):
            self.num_blocks = self._pool_blocks(kv_cache_gib, memory_fraction, memory_share)
            self.kv_cache = PagedKVCache(self.config, self.num_blocks, block_size, self.dtype, self.device)
            self.max_blocks_per_seq = cdiv(max_seq_len, block_size)
            self.block_tables = torch.zeros(max_batch_size, self.max_blocks_per_seq, dtype=torch.long,
                                            device=self.device)
            self._table_owner: list = [None] * max_batch_size
            self._table_len = [0] * max_batch_size
        self.attn = attention_backend(self.device, self.dtype, block_size, capacity.GATHER_TOKENS)
        on_cuda = self.device.type == "cuda"
        decode_mode = decode_mode or ("cuda_graph" if on_cuda else "dynamic")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        if decode_mode == "cuda_graph" and not on_cuda:
            raise ValueError("decode_mode='cuda_graph' needs the model on a CUDA device")
        if self.dynamic_rope:
            decode_mode = "dynamic"  # dynamic NTK rope depends on each row's length: no fixed shapes
        self.decode_mode = decode_mode
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._graph_pool = None

    # ---- memory ----------------------------------------------------------------------------
    def _pool_blocks(self, kv_cache_gib, memory_fraction, memory_share) -> int:
        cfg, bs = self.config, self.block_size
        per_block = capacity.kv_bytes_per_token(cfg, self.dtype) * bs
        most = self.max_batch_size * cdiv(self.max_seq_len, bs) + RESERVED_BLOCKS  # more is never used
        if kv_cache_gib is not None:
            budget, how = int(kv_cache_gib * capacity.GIB), f"kv_cache_gib={kv_cache_gib}"
            advice = "raise kv_cache_gib"
        else:
            forward_tokens = self.prefill_token_budget + self.max_batch_size
            if self.dynamic_rope:  # whole prompts, never chunked
                forward_tokens = max(forward_tokens, self.max_seq_len)
            headroom = capacity.activation_bytes(cfg, self.dtype, forward_tokens, self.max_batch_size)
            weights = capacity.weights_bytes(cfg, self.dtype, "causal", *quantization_of(self.model))
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
            else:
                total, free = capacity.cpu_memory()
            budget = capacity.kv_budget_bytes(total=total, free_after_load=free, weights=weights, headroom=headroom,
                                              memory_fraction=memory_fraction, share=memory_share)
            how = (f"memory_fraction={memory_fraction} x share {memory_share:g} of {total / capacity.GIB:.1f} GiB "
                   f"({free / capacity.GIB:.1f} GiB free after the weights), less {headroom / capacity.GIB:.2f} GiB "
                   "of activations")
            advice = ("lower max_batch_size or prefill_token_budget, use a smaller dtype, or set kv_cache_gib "
                      "explicitly")
        blocks = min(budget // per_block, most)
        if blocks < RESERVED_BLOCKS + 1:
            raise ValueError(f"no room for a KV cache ({how}): it needs {RESERVED_BLOCKS + 1} blocks of {bs} tokens, "
                             f"{(RESERVED_BLOCKS + 1) * per_block / 2**10:.0f} KiB; {advice}")
        return int(blocks)

    # ---- block tables ----------------------------------------------------------------------
    def _sync_table(self, seq) -> None:  # a row's new block ids into its row of the table tensor
        key = (id(seq), seq.admitted)
        row = seq.row
        if self._table_owner[row] != key:
            self._table_owner[row], self._table_len[row] = key, 0
        n, done = len(seq.blocks), self._table_len[row]
        if n > done:
            self.block_tables[row, done:n] = torch.tensor(seq.blocks[done:n], dtype=torch.long)
            self._table_len[row] = n

    # ---- forwards --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: ScheduledStep) -> torch.Tensor:
        """Run one step: hidden states [M, C] in item order, one per position from `outputs_from`
        to the item's end where set, else its last token's if it samples."""
        if step.fresh_blocks:
            self.kv_cache.zero_blocks(torch.tensor(step.fresh_blocks, dtype=torch.long, device=self.device))
        items = step.items
        for item in items:
            self._sync_table(item.seq)
        if self.decode_mode != "dynamic" and all(i.num_tokens == 1 and i.sample for i in items):
            return self._decode_static(items)
        ids, spans, ctx, rows, outputs, n = [], [], [], [], [], 0
        for item in items:
            end = item.start + item.num_tokens
            ids += item.seq.tokens(item.start, end)
            spans.append((n, n + item.num_tokens))
            ctx.append(end)
            rows.append(item.seq.row)
            if item.outputs_from is not None:
                outputs.extend(range(n + item.outputs_from - item.start, n + item.num_tokens))
            elif item.sample:
                outputs.append(n + item.num_tokens - 1)
            n += item.num_tokens
        dev = self.device
        lengths = torch.tensor([item.num_tokens for item in items], device=dev)
        ends = torch.tensor(ctx, device=dev)
        token_rows = torch.repeat_interleave(torch.tensor(rows, device=dev), lengths)
        offsets = torch.arange(n, device=dev) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        positions = torch.repeat_interleave(ends - lengths, lengths) + offsets
        slots = self.block_tables[token_rows, positions // self.block_size] * self.block_size \
            + positions % self.block_size
        rope_lens = None
        if self.dynamic_rope:  # the length each token's rotary comes from, as if its row ran undisturbed
            # (prompt tokens: the prompt's; generated: position + 1): a recomputed row gets the keys it had
            prompt = torch.tensor([len(item.seq.prompt) for item in items], device=dev)
            rope_lens = torch.maximum(torch.repeat_interleave(prompt, lengths), positions + 1)
        meta = self.attn.metadata(positions, spans, ctx, rows, token_rows, self.block_tables, slots, rope_lens)
        hidden = self.model.model(torch.tensor(ids, device=dev), attn_metadata=meta, kv_cache=self.kv_cache)
        return hidden[torch.tensor(outputs, dtype=torch.long, device=dev)]

    @torch.inference_mode()
    def forward_packed(self, rows: list[list[int]]) -> torch.Tensor:
        """Whole rows side by side, each attending to itself, no cache -> last tokens' hidden states [R, C]."""
        dev = self.device
        lengths = [len(r) for r in rows]
        ends = list(itertools.accumulate(lengths))
        spans = [(b - n, b) for n, b in zip(lengths, ends)]
        positions = torch.cat([torch.arange(length, device=dev) for length in lengths])
        rope_lens = None
        if self.dynamic_rope:
            rope_lens = torch.repeat_interleave(torch.tensor(lengths, device=dev), torch.tensor(lengths, device=dev))
        meta = AttentionMetadata(positions, fresh=spans, rope_lens=rope_lens)  # nothing cached
        ids = torch.tensor([t for r in rows for t in r], device=dev)
        hidden = self.model.model(ids, attn_metadata=meta)
        return hidden[torch.tensor(ends, device=dev) - 1]

    # ---- fixed-shape decode (CUDA graphs, and their eager twin) -----------------------------
    def _decode_static(self, items) -> torch.Tensor:
        B = len(items)
        Bb = _bucket(B, self.max_batch_size)
        nb = _bucket(max(cdiv(i.start + 1, self.block_size) for i in items), self.max_blocks_per_seq)
        pad = Bb - B
        dev = self.device
        ids = torch.tensor([i.seq.tokens(i.start, i.start + 1)[0] for i in items] + [0] * pad, device=dev)
        positions = torch.tensor([i.start for i in items] + [0] * pad, device=dev)
        rows = torch.tensor([i.seq.row for i in items], device=dev)
        tables = torch.zeros(Bb, nb, dtype=torch.long, device=dev)  # padded rows: the null block
        tables[:B] = self.block_tables[rows, :nb]
        slots = tables[torch.arange(Bb, device=dev), positions // self.block_size] * self.block_size \
            + positions % self.block_size
        slots[B:] = SCRATCH_BLOCK * self.block_size  # padded rows write into the scratch block
        lens = positions + 1
        if self.decode_mode == "static" or len(self._graphs) >= MAX_GRAPHS and (Bb, nb) not in self._graphs:
            return self._static_step(ids, positions, slots, tables, lens)[:B]
        graph, inputs, out = self._graph(Bb, nb)
        for static, value in zip(inputs, (ids, positions, slots, tables, lens)):
            static.copy_(value)
        graph.replay()
        return out[:B]

    def _static_step(self, ids, positions, slots, tables, lens) -> torch.Tensor:
        meta = self.attn.static_metadata(positions, slots, tables, lens)
        return self.model.model(ids, attn_metadata=meta, kv_cache=self.kv_cache)

    def _graph(self, Bb: int, nb: int):
        """The decode step's CUDA graph for Bb rows and tables nb wide, captured on first use
        (writing only into the scratch block: every input row is padding)."""
        if (Bb, nb) in self._graphs:
            return self._graphs[(Bb, nb)]
        dev = self.device
        inputs = (torch.zeros(Bb, dtype=torch.long, device=dev), torch.zeros(Bb, dtype=torch.long, device=dev),
                  torch.full((Bb,), SCRATCH_BLOCK * self.block_size, dtype=torch.long, device=dev),
                  torch.zeros(Bb, nb, dtype=torch.long, device=dev), torch.ones(Bb, dtype=torch.long, device=dev))
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph: allocator, kernel selection
                self._static_step(*inputs)
        torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self._static_step(*inputs)
        self._graph_pool = graph.pool()
        self._graphs[(Bb, nb)] = (graph, inputs, out)
        return self._graphs[(Bb, nb)]

    def info(self) -> dict:
        return {"kv_cache_bytes": self.kv_cache.nbytes if self.kv_cache is not None else 0,
                "kv_blocks": self.num_blocks, "decode_mode": self.decode_mode,
                "attention_backend": self.attn.name, "packed_cpu_linears": self.packed,
                "cuda_graphs": len(self._graphs)}
