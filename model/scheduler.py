"""The scheduler: which rows run in the next forward, and where their KV cache lives. No torch.

- `BlockManager`: the KV pool as fixed-size blocks with a free list, reference counts and a
  prefix cache. A full block is known by a hash chained over every token up to its end, so rows
  that start alike (in one call or across calls) share blocks by reference; unreferenced cached
  blocks are evicted least recently used when the free list runs dry. Block 0 (null: table
  padding) and block 1 (scratch: padded rows of a fixed-shape decode write there) are never
  handed out.
- `Scheduler.schedule()` gives each decoding row the block its next token may need, preempting
  the most recently admitted row when the pool is out (freed, recomputed later from prompt and
  output), then admits waiting rows while their blocks (plus a token of headroom) are free, rows
  < max_rows and the step's prefill token budget lasts; long prompts prefill in chunks. A row
  whose first uncached block another row admitted this step is computing waits a step, then
  shares it. `update()` ends rows at a stop id or length limit; `finish()` for a reason found
  later (stop strings, grammars). Text never comes here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from llguidance import LLMatcher

SCRATCH_BLOCK = 1  # block 0 is the null block
RESERVED_BLOCKS = 2
# the engine's bounds (ModelRunner checks them; pipeline/settings refuses past them on the driver)
MAX_NUM_SEQS = 1 << 20
MAX_SEQ_LEN = 1 << 24  # also the most tokens one prefill forward may take
# Admission holds back growth_ratio x (the running rows' remaining new tokens): the fraction of
# max_new_tokens that finished rows actually generated (a running mean, then a moving average),
# starting from a prior, raised on every preemption.
GROWTH_PRIOR, GROWTH_MIN_WEIGHT, GROWTH_PER_PREEMPTION = 0.5, 0.02, 0.05


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Fixed-size KV blocks: allocation, reference counts, prefix cache (see module docstring)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: list[int] = list(range(num_blocks - 1, RESERVED_BLOCKS - 1, -1))  # pop() -> lowest id
        self.ref = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self.fresh: list[int] = []  # handed out since the runner last took them (it zeroes them)
        self.used_peak = 0
        self.hit_tokens = 0

    @property
    def capacity(self) -> int:
        return self.num_blocks - RESERVED_BLOCKS

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (reference 1), or None if fewer than n can be had."""
        if n > self.num_free:
            return None
        blocks = []
        for _ in range(n):
            if self.free:
                block = self.free.pop()
            else:  # evict the least recently used cached block
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of.pop(block)]
            self.ref[block] = 1
            blocks.append(block)
        self.fresh.extend(blocks)
        self.used_peak = max(self.used_peak, self.num_used)
        return blocks

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.ref[block] -= 1
            if self.ref[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None  # most recently used at the end
                else:
                    self.free.append(block)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached run of `hashes`, each with a reference taken."""
        blocks = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1
        self.used_peak = max(self.used_peak, self.num_used)
        return blocks

    def register(self, block: int, h: bytes) -> None:
        """Make a fully computed block findable by its hash (the first block with a hash wins)."""
        if self.prefix_caching and h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h


@dataclass(eq=False)
class Sequence:
    """One row. The last output token's keys are computed only when it is fed back. A scoring
    row (`score_from` set) samples nothing: it gets hidden states from `score_from` on."""
    index: int
    prompt: list[int]
    params: SamplingParams | None = None  # None for scoring rows
    stop_ids: frozenset = frozenset()
    score_from: int | None = None
    output: list[int] = field(default_factory=list)
    # per output token with params.logprobs set: (its log-probability, top ids, their log-probabilities)
    logprobs: list[tuple[float, list[int], list[float]]] = field(default_factory=list)
    prompt_logprobs: list[float] = field(default_factory=list)  # of prompt tokens 1, 2, ... so far
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    row: int = -1
    admitted: int = -1  # admission order (preemption takes the largest)
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    error_kind: str | None = None  # why it failed, as one word
    cacheable_tokens: int = 1 << 62  # only blocks ending at or before this are shared
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks, computed lazily
    num_registered: int = 0  # leading full blocks already offered to the prefix cache
    seed: int = 0  # the sampler's randomness for this row (model/sampling.py)
    targets: list[tuple[int, int, list[int]]] = field(default_factory=list)  # scoring: (prompt, choice, its tokens)
    grammar: LLMatcher | None = None  # the grammar state of a structured row (model/structured.py)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int, end: int) -> list[int]:
        P = len(self.prompt)
        if end <= P:
            return self.prompt[start:end]
        if start >= P:
            return self.output[start - P:end - P]
        return self.prompt[start:] + self.output[:end - P]

    def block_hashes(self, n_blocks: int, block_size: int) -> list[bytes]:
        """Hashes of the first n_blocks full blocks (each chained over all tokens before it)."""
        while len(self.hashes) < n_blocks:
            i = len(self.hashes)
            h = hashlib.blake2b(self.hashes[-1] if self.hashes else b"", digest_size=16)
            h.update(array("q", self.tokens(i * block_size, (i + 1) * block_size)).tobytes())
            self.hashes.append(h.digest())
        return self.hashes[:n_blocks]

    @property
    def hidden_from(self) -> int | None:
        """The first position whose hidden state a step returns besides the sampled one (None:
        only that): score_from, or the next prompt position without a log-probability. Blocks
        after it never come from the prefix cache: cached tokens have no hidden state."""
        if self.score_from is not None:
            return self.score_from
        if self.params is not None and self.params.prompt_logprobs and len(self.prompt_logprobs) < len(self.prompt) - 1:
            return len(self.prompt_logprobs)
        return None

    @property
    def prefilled(self) -> bool:  # decoding: every token but the newest sampled one has keys
        return self.num_computed >= self.num_tokens - 1 and bool(self.output)


@dataclass
class StepItem:
    seq: Sequence
    start: int  # first position fed (= tokens already cached)
    num_tokens: int
    sample: bool  # a token is sampled from the last position
    outputs_from: int | None  # absolute position from which hidden states are returned (None: only a sampled one)
    decode: bool = False  # a decoding row's one token (else a prefill chunk or a scoring row)


@dataclass
class ScheduledStep:
    items: list[StepItem]  # decoding rows first, then prefill chunks
    preempted: list[Sequence]
    num_prefill_tokens: int = 0
    fresh_blocks: list[int] = field(default_factory=list)  # handed out this step: the runner zeroes them


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_rows: int, max_seq_len: int, prefill_token_budget: int,
                 chunked_prefill: bool = True, watermark: float = 0.01, reserve_growth: bool = True):
        self.blocks, self.bs = blocks, blocks.block_size
        self.max_rows, self.max_seq_len = max_rows, max_seq_len
        self.prefill_token_budget, self.chunked_prefill = prefill_token_budget, chunked_prefill
        self.watermark = max(1, int(watermark * blocks.capacity))
        self.reserve_growth = reserve_growth
        self.growth_ratio, self._observed = GROWTH_PRIOR, 0
        self._reserved = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self._admissions = self.preemptions = self.rows_in_flight_peak = 0
        self.steps = self.prefill_tokens = self.decode_tokens = 0

    # ---- queue -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> bool:
        """Queue a row; False (the row finished with an error) if even the empty pool cannot hold it."""
        longest = seq.num_tokens if seq.params is None else min(
            len(seq.prompt) + seq.params.max_new_tokens, self.max_seq_len)
        need = cdiv(longest, self.bs)
        if need > self.blocks.capacity:
            seq.finish_reason, seq.error_kind, seq.error = "error", "kv_cache_too_small", (
                f"this row needs up to {longest} tokens of KV cache ({len(seq.prompt)} prompt"
                + ("" if seq.params is None else f" + {seq.params.max_new_tokens} max_new_tokens")
                + f") but the whole pool holds {self.blocks.capacity * self.bs} tokens: lower max_new_tokens, "
                "or give the engine more KV memory (kv_cache_gib / memory_fraction)")
            return False
        self.waiting.append(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(items=[], preempted=[])
        self._grow_decoding(step)
        self._schedule_prefill(step)
        step.fresh_blocks = self.blocks.take_fresh()
        if step.preempted:  # admitted too much: hold back more until finished rows say otherwise
            self.growth_ratio = min(1.0, self.growth_ratio + GROWTH_PER_PREEMPTION * len(step.preempted))
        self.steps += 1
        self.rows_in_flight_peak = max(self.rows_in_flight_peak, len(self.running))
        return step

    def _grow_decoding(self, step: ScheduledStep) -> None:
        """Give each decoding row's newest token a block, preempting the most recently admitted
        rows when the pool is out (oldest rows first, so the oldest always progresses)."""
        for seq in list(self.running):
            if seq.row < 0 or not seq.prefilled:
                continue  # preempted in this loop, or still prefilling
            need = cdiv(seq.num_tokens, self.bs) - len(seq.blocks)
            while need > 0:
                got = self.blocks.allocate(need)
                if got is not None:
                    seq.blocks += got
                    break
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is seq:
                    break
            if seq.row >= 0:
                step.items.append(StepItem(seq, seq.num_tokens - 1, 1, True, None, decode=True))

    def _growth_blocks(self, seq: Sequence) -> int:
        """Blocks a running row should still need: `growth_ratio` of its remaining new tokens."""
        if seq.params is None or not self.reserve_growth:
            return 0
        remaining = min(seq.params.max_new_tokens - len(seq.output), self.max_seq_len - seq.num_tokens)
        expected = seq.num_tokens + int(self.growth_ratio * max(0, remaining))
        return max(0, cdiv(expected, self.bs) - len(seq.blocks))

    def _schedule_prefill(self, step: ScheduledStep) -> None:
        # admission keeps back the blocks the running rows are expected to grow into
        self._reserved = sum(self._growth_blocks(seq) for seq in self.running)
        budget = self.prefill_token_budget
        for seq in self.running:  # rows part-way through a chunked prefill
            if budget <= 0:
                break
            if seq.row >= 0 and not seq.prefilled and seq.num_computed < seq.num_tokens:
                budget -= self._add_prefill(step, seq, budget)
        pending: set[bytes] = set()  # block hashes this step's admissions will compute
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_rows:
            seq = self.waiting[0]
            verdict = self._try_admit(seq, pending, budget, step)
            if verdict == "full":
                break
            self.waiting.popleft()
            if verdict == "defer":
                deferred.append(seq)
                if len(deferred) >= self.max_rows:
                    break
                continue
            budget -= self._add_prefill(step, seq, budget)
        self.waiting.extendleft(reversed(deferred))

    def _try_admit(self, seq: Sequence, pending: set, budget: int, step: ScheduledStep) -> str:
        """'ok' (admitted: blocks and a row taken), 'defer' (its first block to compute is being
        computed by another row this step: wait one step and share it) or 'full' (not now)."""
        total = seq.num_tokens
        limit = total - 1 if seq.hidden_from is None else min(total - 1, seq.hidden_from)
        n_cacheable = min(limit, seq.cacheable_tokens) // self.bs if self.blocks.prefix_caching else 0
        hashes = seq.block_hashes(n_cacheable, self.bs) if n_cacheable else []
        n_hit = next((k for k, h in enumerate(hashes) if h not in self.blocks.cached), len(hashes))
        if n_hit < len(hashes) and hashes[n_hit] in pending:
            return "defer"
        if not self.chunked_prefill and step.num_prefill_tokens and total - n_hit * self.bs > budget:
            return "full"  # a whole prompt that does not fit this step's budget waits for the next
        need = cdiv(total + (1 if seq.score_from is None else 0), self.bs) - n_hit
        reserve = self.watermark + self._reserved if self.running else 0
        hit = self.blocks.lookup(hashes[:n_hit])  # first: looked-up blocks leave the evictable set
        got = self.blocks.allocate(need) if need + reserve <= self.blocks.num_free else None
        if got is None:
            self.blocks.release(hit)
            return "full"
        self.blocks.hit_tokens += n_hit * self.bs
        seq.blocks = hit + got
        seq.num_computed = n_hit * self.bs
        seq.num_registered = n_hit
        seq.row = self.free_rows.pop()
        seq.admitted = self._admissions
        self._admissions += 1
        self.running.append(seq)
        self._reserved += self._growth_blocks(seq)
        pending.update(hashes[n_hit:])
        return "ok"

    def _add_prefill(self, step: ScheduledStep, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed
        n = min(remaining, budget) if self.chunked_prefill else remaining
        end = seq.num_computed + n
        sample = end == seq.num_tokens and seq.score_from is None
        outputs, wanted = None, seq.hidden_from
        if wanted is not None and end > wanted:
            outputs = max(wanted, seq.num_computed)
        step.items.append(StepItem(seq, seq.num_computed, n, sample, outputs))
        step.num_prefill_tokens += n
        return n

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self._register_blocks(seq)
        self._free(seq)
        seq.num_computed = 0
        step.items = [i for i in step.items if i.seq is not seq]
        step.preempted.append(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    # ---- after the forward -----------------------------------------------------------------
    def update(self, step: ScheduledStep, sampled: list[int], logprobs: list | None = None) -> list[Sequence]:
        """Record the step: the tokens sampled for the items with `sample` (in order) and their
        `logprobs` (aligned, None where not asked). Returns the rows ended by a stop id or a length
        limit (blocks and table rows released); stop strings and grammars are `finish`'s."""
        finished = []
        k = 0
        for item in step.items:
            seq = item.seq
            seq.num_computed += item.num_tokens
            if item.decode:
                self.decode_tokens += 1
            else:
                self.prefill_tokens += item.num_tokens
            self._register_blocks(seq)
            reason = None
            if item.sample:
                seq.output.append(sampled[k])
                if logprobs is not None and logprobs[k] is not None:
                    seq.logprobs.append(logprobs[k])
                k += 1
                if seq.output[-1] in seq.stop_ids:
                    reason = "stop"
                elif len(seq.output) >= seq.params.max_new_tokens or seq.num_tokens >= self.max_seq_len:
                    reason = "length"
            elif seq.score_from is not None and seq.num_computed == seq.num_tokens:
                reason = "length"
            if reason and self.finish(seq, reason):
                finished.append(seq)
        if k != len(sampled):
            raise ValueError(f"{len(sampled)} sampled tokens for {k} sampling rows")
        return finished

    def finish(self, seq: Sequence, reason: str) -> bool:
        """End a row ("stop" | "length" | "error"), releasing its blocks and table row (a finished
        row takes the later reason). True if it was still unfinished."""
        first = seq.finish_reason is None
        if first and seq.params is not None and reason in ("stop", "length"):
            self._learn_growth(seq)
        seq.finish_reason = reason
        if seq in self.running:
            self._free(seq)
        return first

    def _free(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        self.free_rows.append(seq.row)
        seq.blocks, seq.row = [], -1

    def _register_blocks(self, seq: Sequence) -> None:
        full = min(seq.num_computed, seq.cacheable_tokens) // self.bs
        if full > seq.num_registered and self.blocks.prefix_caching:
            hashes = seq.block_hashes(full, self.bs)
            for i in range(seq.num_registered, full):
                self.blocks.register(seq.blocks[i], hashes[i])
            seq.num_registered = full

    def _learn_growth(self, seq: Sequence) -> None:
        """Fold a finished row's share of its allowed new tokens into growth_ratio."""
        allowed = min(seq.params.max_new_tokens, self.max_seq_len - len(seq.prompt))
        if allowed <= 0:
            return
        self._observed += 1
        weight = max(GROWTH_MIN_WEIGHT, 1.0 / (self._observed + 1))  # the prior counts as one row
        self.growth_ratio += weight * (min(1.0, len(seq.output) / allowed) - self.growth_ratio)

    def abort_all(self) -> None:
        """Drop every queued and running row (after an exception), releasing their blocks."""
        for seq in list(self.running):
            self.finish(seq, "error")
        self.waiting.clear()

    def stats(self) -> dict:
        b = self.blocks
        return {
            "kv_block_size": self.bs,
            "kv_tokens_capacity": b.capacity * self.bs,
            "kv_tokens_peak": b.used_peak * self.bs,
            "rows_in_flight_peak": self.rows_in_flight_peak,
            "max_rows_in_flight": self.max_rows,
            "preemptions": self.preemptions,
            "growth_ratio": round(self.growth_ratio, 3),
            "prefix_cache_hit_tokens": b.hit_tokens,
            "prefill_tokens": self.prefill_tokens,
            "decode_tokens": self.decode_tokens,
            "steps": self.steps,
        }
