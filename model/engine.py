"""The engine: batched, KV-cached generation with continuous batching over a paged KV cache,
plus choice scoring and classification. vLLM in miniature, in three parts:

- the scheduler (model/scheduler.py, no torch) decides each step: which rows decode, which
  prompts are admitted and prefilled (by free KV blocks, not by slots), which row is preempted
  when the pool runs out, when a row stops;
- the model runner (model/runner.py) owns the weights, the KV pool and CUDA graphs and runs the
  step as one packed forward, returning hidden states only where a token is sampled or scored;
- the sampler (model/sampling.py) turns the step's logits into tokens, all rows at once.

`Engine.generate` loops schedule -> execute -> sample -> update until every row is done.
`score_choices` runs (prompt + choice) rows through the same scheduler, with no sampling; rows
that share a prompt share its KV blocks through the prefix cache. `classify` runs packed rows
with no cache. Memory: the KV pool is a budget (`kv_cache_gib`, or `memory_fraction` of what is
free after the weights load, times `memory_share` when replicas share a device); `max_batch_size`
only caps rows in flight and `max_seq_len` only caps a row's length: neither costs memory.
"""

from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field

import torch

from .checkpoint import load_pretrained, resolve_dtype
from .config import PersimmonConfig
from .modeling import PersimmonForCausalLM, PersimmonForSequenceClassification
from .runner import ModelRunner, unpack_cpu_linears
from .sampling import Sampler
from .sampling_params import SamplingParams
from .scheduler import BlockManager, Scheduler, Sequence

LOGITS_ROWS = 64  # rows of scoring logits [rows, vocab] computed at once
log = logging.getLogger(__name__)


class RowError(ValueError):
    """Why the engine cannot run one row: `kind` (empty_prompt, invalid_prompt, prompt_too_long,
    invalid_choice, ...) and the message. Results carry both, as `error_kind` and `error`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _kind(e: Exception, default: str) -> str:
    return getattr(e, "kind", default)


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "error"  # "stop" | "length" | "error"
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    logprobs: list[float] | None = None
    error: str | None = None
    error_kind: str | None = None  # why, as one word (RowError kinds, kv_cache_too_small, grammar_error)


@dataclass
class Classification:
    label: str | None = None
    score: float | None = None  # probability of `label` (the value itself for regression)
    probs: list[float] | None = None
    error: str | None = None
    error_kind: str | None = None  # why, as one word (RowError kinds, kv_cache_too_small, grammar_error)


@dataclass
class ChoiceScores:
    label: str | None = None  # the most likely choice
    scores: list[float] | None = None  # log-likelihood of each choice (sum or mean), in `choices` order
    num_tokens: list[int] | None = None  # continuation tokens of each choice
    error: str | None = None
    error_kind: str | None = None  # why, as one word (RowError kinds, kv_cache_too_small, grammar_error)


def token_budget_packs(items: list, size, budget: int):
    """`items` in order, cut into consecutive packs of at most `budget` tokens (`size(item)`
    each); an item larger than the budget is a pack of its own."""
    pack, tokens = [], 0
    for item in items:
        if pack and tokens + size(item) > budget:
            yield pack
            pack, tokens = [], 0
        pack.append(item)
        tokens += size(item)
    if pack:
        yield pack


class Engine:
    """One Persimmon replica: model, tokenizer, KV pool, scheduler and sampler.

    The engine takes the model over: it casts / moves it in place (dtype, device) and packs its
    CPU weights. Build one engine per model; a later engine on the same model re-casts it, and
    the earlier one then refuses to run (it says so) rather than mixing dtypes.

    Args:
        max_batch_size: most rows in flight at once (a cap, not a reservation).
        max_seq_len: most tokens (prompt + generated) per row; default max_position_embeddings.
        prefill_token_budget: most prompt tokens computed in one forward (longer prompts are
            prefilled in chunks across steps); bounds activation memory.
        kv_cache_gib: size of the KV pool; None = `memory_fraction` of the device memory free
            after the weights load, times `memory_share` (this replica's part of a shared
            device), less activation headroom (model/capacity.py).
        kv_block_size: tokens per KV block.
        prefix_caching: share the KV blocks of identical leading tokens between rows and calls.
        decode_mode: "dynamic" (CPU default), "static" (fixed shapes, eager) or "cuda_graph"
            (CUDA default).
        packed_cpu_linears: oneDNN-packed Linear weights on CPU. None (default): where this CPU
            supports them for the dtype (model.runner.cpu_packing_unsupported), else F.linear;
            True where unsupported is a ValueError saying why.
    """

    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 256, max_seq_len: int | None = None,
                 dtype=None, device=None, prefill_token_budget: int = 4096, kv_cache_gib: float | None = None,
                 memory_fraction: float = 0.9, memory_share: float = 1.0, kv_block_size: int = 16,
                 prefix_caching: bool = True, decode_mode: str | None = None,
                 packed_cpu_linears: bool | None = None):
        dtype = resolve_dtype(dtype)
        unpack_cpu_linears(model)  # packed weights from an earlier engine would go stale on a cast
        if dtype is not None or device is not None:
            model = model.to(dtype=dtype, device=device)
        self.model = model.eval()
        self.config: PersimmonConfig = model.config
        self.tokenizer = tokenizer
        self.max_seq_len = self.config.max_position_embeddings if max_seq_len is None else max_seq_len
        for name, value, low, high in (("max_batch_size", max_batch_size, 1, 1 << 20),
                                       ("prefill_token_budget", prefill_token_budget, 1, 1 << 24),
                                       ("kv_block_size", kv_block_size, 1, 1024),
                                       ("max_seq_len", self.max_seq_len, 2, 1 << 24)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        for name, value, allow_none in (("kv_cache_gib", kv_cache_gib, True), ("memory_fraction", memory_fraction, False),
                                        ("memory_share", memory_share, False)):
            if value is None and allow_none:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
                    or (name != "kv_cache_gib" and value > 1):
                limit = "a finite number of GiB > 0" if name == "kv_cache_gib" else "a number in (0, 1]"
                raise ValueError(f"{name} must be {limit}, got {value!r}")
        if self.max_seq_len > self.config.max_position_embeddings and self.config.rope_type == "default":
            log.warning("max_seq_len=%d is past the model's max_position_embeddings=%d: positions beyond it "
                        "were never trained", self.max_seq_len, self.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.prefill_token_budget = prefill_token_budget
        self.runner = ModelRunner(model, max_batch_size=max_batch_size, max_seq_len=self.max_seq_len,
                                  prefill_token_budget=prefill_token_budget, block_size=kv_block_size,
                                  kv_cache_gib=kv_cache_gib, memory_fraction=memory_fraction,
                                  memory_share=memory_share, decode_mode=decode_mode,
                                  packed_cpu_linears=packed_cpu_linears)
        self.decode_mode = self.runner.decode_mode
        self.scheduler = None
        if self.runner.kv_cache is not None:
            self.scheduler = Scheduler(BlockManager(self.runner.num_blocks, kv_block_size, prefix_caching),
                                       max_rows=max_batch_size, max_seq_len=self.max_seq_len,
                                       prefill_token_budget=prefill_token_budget,
                                       chunked_prefill=self.config.rope_type != "dynamic",
                                       decode=self._decode if tokenizer is not None else None)
        self.sampler = Sampler()
        self._pinned: list[int] = []  # KV blocks held by pin_prefix
        self._constraints = None  # grammar machinery, built on the first structured row

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, **kwargs) -> "Engine":
        """Load model (the class config.json names) and tokenizer from an HF-layout directory.
        device None = CUDA when available, else CPU. kwargs go to Engine()."""
        from .tokenizer import PersimmonTokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_pretrained(path, dtype=dtype, device=device)
        tokenizer = None
        if os.path.isfile(os.path.join(os.fspath(path), "tokenizer.model")):
            tokenizer = PersimmonTokenizer.from_pretrained(path)
        return cls(model, tokenizer, **kwargs)

    def stats(self) -> dict:
        """Sizing facts and counters since the engine was built: kv_tokens_capacity,
        kv_tokens_peak, rows_in_flight_peak, preemptions, prefix-cache hits, ..."""
        out = dict(self.runner.info())
        out["max_batch_size"], out["max_seq_len"] = self.max_batch_size, self.max_seq_len
        if self.scheduler is not None:
            out.update(self.scheduler.stats())
            out["pinned_prefix_tokens"] = len(self._pinned) * self.scheduler.bs
        return out

    # ---- input handling --------------------------------------------------------------------
    def _encode(self, prompt, add_bos=True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token-id lists")
            if not prompt.strip():
                raise RowError("empty_prompt", "empty prompt")
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise RowError("invalid_prompt", "a prompt must be a string or a list of token ids, got "
                           f"{type(prompt).__name__}")
        if not prompt:
            raise RowError("empty_prompt", "empty prompt")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RowError("invalid_prompt", f"token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        return list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""

    def _stop_ids(self, params: SamplingParams) -> frozenset:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                ids.add(self.tokenizer.eos_token_id)
            ids.update(self.config.eos_ids())
        return frozenset(ids)

    def _cacheable(self, prompt: list[int]) -> int:
        """Tokens of a row whose KV blocks may be shared: all, except with dynamic NTK rope, where
        keys past max_position_embeddings depend on the row's length."""
        if self.config.rope_type != "dynamic":
            return 1 << 62
        limit = self.config.max_position_embeddings
        return limit if len(prompt) <= limit else 0

    def _require_causal(self, what: str) -> None:
        if not isinstance(self.model, PersimmonForCausalLM):
            raise TypeError(f"{what} needs a causal LM checkpoint (PersimmonForCausalLM)")

    # ---- the loop --------------------------------------------------------------------------
    def _drive(self, on_scores=None):
        """Run the scheduler until every queued row is done; yields rows as they finish.
        `on_scores([(seq, hidden)])` receives, each step, the hidden states of scoring rows'
        positions (before the scheduler counts the step as computed)."""
        sched, runner = self.scheduler, self.runner
        param = next(self.model.parameters())
        if (param.dtype, param.device) != (runner.dtype, runner.device):
            sched.abort_all()
            raise RuntimeError(f"this engine's model was moved to {param.dtype} on {param.device} after the engine "
                               f"was built for {runner.dtype} on {runner.device} (by another Engine on the same "
                               "model?): build one engine per model")
        try:
            while sched.has_work():
                step = sched.schedule()
                if not step.items:
                    raise RuntimeError("scheduler made no progress (a bug): "
                                       f"{len(sched.waiting)} waiting, {len(sched.running)} running")
                constrained = [i.seq for i in step.items if i.sample and i.seq.grammar is not None]
                masks = self._constraints.masks_async([s.grammar for s in constrained]) if constrained else None
                hidden = runner.execute(step)  # the grammar masks are filled meanwhile
                sampling, scoring, at = [], [], 0
                for item in step.items:
                    if item.outputs_from is not None:
                        n = item.start + item.num_tokens - item.outputs_from
                        scoring.append((item.seq, hidden[at:at + n]))
                        at += n
                    elif item.sample:
                        sampling.append((item.seq, at))
                        at += 1
                if scoring:
                    on_scores(scoring)
                tokens, logprobs = [], None
                if sampling:
                    seqs = [s for s, _ in sampling]
                    logits = runner.lm_head(hidden[torch.tensor([i for _, i in sampling], device=hidden.device)])
                    if masks is not None:
                        logits = self._apply_masks(logits, seqs, constrained, masks.result())
                    tokens, logprobs = self.sampler(logits, [s.params for s in seqs], [s.seed for s in seqs],
                                                    [len(s.output) for s in seqs],
                                                    want_logprobs=any(s.params.logprobs for s in seqs))
                    if constrained:
                        self._advance_grammars(seqs, tokens)
                yield from sched.update(step, tokens, logprobs)
        except BaseException:
            sched.abort_all()
            raise

    # ---- structured output -------------------------------------------------------------------
    def _apply_masks(self, logits, seqs, constrained, bitmask):
        """Disallowed tokens of constrained rows to -inf. A row whose grammar allows nothing
        (an error state) is ended with an error instead of sampling from an empty set."""
        from .structured import apply_masks, error_text

        where = {id(s): r for r, s in enumerate(seqs)}
        rows = torch.tensor([where[id(s)] for s in constrained], device=logits.device)
        logits = logits.float()
        masked = apply_masks(logits[rows], bitmask)
        for k, s in enumerate(constrained):
            # an error state allows only EOS: a row that "stopped" there would not match
            if bitmask[k].count_nonzero() == 0 or s.grammar.is_error():
                s.finish_reason, s.error_kind = "error", "grammar_error"
                s.error = f"no text can continue the constraint here ({error_text(s.grammar)})"
                masked[k] = logits[rows[k]]  # sample anything: the row is ended with the error
        logits[rows] = masked
        return logits

    def _advance_grammars(self, seqs, tokens) -> None:
        from .structured import error_text

        for s, tok in zip(seqs, tokens):
            m = s.grammar
            if m is None or s.finish_reason:
                continue
            if tok in s.stop_ids and m.is_accepting():
                continue  # EOS after a complete structure: the scheduler stops the row
            if not m.consume_token(tok):
                s.finish_reason, s.error_kind, s.error = "error", "grammar_error", error_text(m)
            elif m.is_stopped():
                s.grammar_done = True

    def _constrain(self, seq: Sequence) -> None:
        """Give a row with json_schema / regex / choice its grammar matcher."""
        if self.tokenizer is None:
            raise ValueError("structured output needs an engine with a tokenizer")
        if self._constraints is None:
            from .structured import Constraints

            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.config.eos_ids()[0]
            self._constraints = Constraints(self.tokenizer, self.config.vocab_size, eos)
        seq.grammar = self._constraints.matcher(seq.params)

    # ---- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Complete every prompt; results in input order. Bad rows get finish_reason "error"."""
        self._require_causal("generate")
        params = params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        bad = [type(p).__name__ for p in params if not isinstance(p, SamplingParams)]
        if bad:
            raise TypeError(f"params must be SamplingParams, got {bad[0]}")
        results: list[Completion | None] = [None] * len(prompts)
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                try:
                    ids = self._fit_prompt(self._encode(prompt), p)
                except ValueError as e:
                    results[i] = Completion(error=str(e), error_kind=_kind(e, "invalid_prompt"), finish_reason="error",
                                            num_prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
                    continue
                seq = Sequence(i, ids, p, self._stop_ids(p), cacheable_tokens=self._cacheable(ids))
                seq.seed = p.seed if p.seed is not None else random.getrandbits(62)
                if p.constrained:
                    try:
                        self._constrain(seq)
                    except ValueError as e:  # the row's own schema / regex: a setting, not its prompt
                        results[i] = Completion(error=str(e), error_kind=_kind(e, "invalid_sampling"), finish_reason="error", num_prompt_tokens=len(ids))
                        continue
                if not self.scheduler.add(seq):
                    results[i] = Completion(error=seq.error, error_kind=seq.error_kind, finish_reason="error",
                                            num_prompt_tokens=len(ids))
        except BaseException:
            self.scheduler.abort_all()  # nothing half-queued may leak into the next call
            raise
        for seq in self._drive():
            results[seq.index] = self._completion(seq)
        return results

    def _fit_prompt(self, ids: list[int], p: SamplingParams) -> list[int]:
        """The prompt, or with truncate='left' its last tokens: as many as leave room for
        max_new_tokens, but never less than half of max_seq_len (a long max_new_tokens does not
        cut the prompt to nothing)."""
        room = self.max_seq_len - 1  # at least one new token must fit
        if len(ids) <= room:
            return ids
        if p.truncate != "left":
            raise RowError("prompt_too_long", f"prompt has {len(ids)} tokens, more than the {room} this engine's "
                             f"max_seq_len={self.max_seq_len} allows (use truncate='left')")
        keep = max(self.max_seq_len - p.max_new_tokens, self.max_seq_len // 2, 1)
        return ids[-min(keep, room):]

    def _completion(self, seq: Sequence) -> Completion:
        if seq.finish_reason == "error":
            return Completion(error=seq.error, error_kind=seq.error_kind, finish_reason="error",
                              num_prompt_tokens=len(seq.prompt),
                              token_ids=list(seq.output), num_generated_tokens=len(seq.output))
        ids = seq.output
        body = ids[:-1] if seq.finish_reason == "stop" and ids and ids[-1] in seq.stop_ids else ids
        text = seq.text if seq.text is not None else self._decode(body)
        return Completion(text=text, token_ids=list(ids), finish_reason=seq.finish_reason,
                          num_prompt_tokens=len(seq.prompt), num_generated_tokens=len(ids),
                          logprobs=list(seq.logprobs) if seq.params.logprobs else None)

    # ---- scoring ---------------------------------------------------------------------------
    @torch.inference_mode()
    def score_choices(self, prompts, choices: list, *, normalize: str = "sum", separator: str = " ",
                      add_bos: bool = True) -> list[ChoiceScores]:
        """Log-likelihood of each choice as the continuation of each prompt.

        Continuation tokens are found as lm-evaluation-harness does: the tokens of
        `prompt + separator + choice` after the prompt's own tokens (sentencepiece merges across
        the boundary, and encoding a choice alone would add a dummy-prefix space); whitespace at
        the end of the prompt moves into the continuation. The model sees the prompt's tokens,
        then those. Token-id prompts and choices are used as they are (no separator).
        normalize: "sum" (total log-likelihood) or "mean" (divided by the choice's token count,
        so long labels are not penalised for their length).

        Each (prompt, choice) pair is one scoring row, computed up to the choice's last token but
        one, with the head applied only where a choice token is predicted. The rows of a prompt
        share its full KV blocks through the prefix cache (so does a prefix shared by all
        prompts, few-shot examples, and across calls); identical rows are computed once."""
        self._require_causal("score_choices")
        if normalize not in ("sum", "mean"):
            raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
        if not choices:
            raise ValueError("score_choices needs at least one choice")
        if any(isinstance(c, str) for c in choices) and self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass choices as token-id lists")
        labels = [c if isinstance(c, str) else str(c) for c in choices]
        results: list[ChoiceScores | None] = [None] * len(prompts)
        scores: dict[int, list[float]] = {}
        lengths: dict[int, list[int]] = {}
        rows: dict[tuple, Sequence] = {}
        for i, prompt in enumerate(prompts):
            try:
                context, continuations = self._continuations(prompt, choices, separator, add_bos)
            except ValueError as e:
                results[i] = ChoiceScores(error=str(e), error_kind=_kind(e, "invalid_prompt"))
                continue
            scores[i], lengths[i] = [0.0] * len(choices), [len(c) for c in continuations]
            for k, cont in enumerate(continuations):
                tokens = tuple(context + cont[:-1])
                key = (tokens, len(context))  # the same tokens scored from elsewhere are another row
                seq = rows.get(key)
                if seq is None:
                    seq = rows[key] = Sequence(len(rows), list(tokens), score_from=len(context) - 1,
                                               cacheable_tokens=self._cacheable(context))
                seq.targets.append((i, k, cont))  # (prompt, choice, the tokens its positions predict)
        for seq in rows.values():
            if not self.scheduler.add(seq):
                for i, _, _ in seq.targets:
                    results[i] = ChoiceScores(error=seq.error, error_kind=seq.error_kind)
                    scores.pop(i, None)

        def on_scores(chunks):  # [(row, hidden [n, C] of its positions from max(score_from, computed))]
            picks, hidden, at = [], [], 0
            for seq, h in chunks:
                start = max(seq.score_from, seq.num_computed)  # num_computed: before this step
                for i, k, cont in seq.targets:
                    for j in range(h.shape[0]):
                        t = start + j - seq.score_from  # this position predicts continuation token t
                        if t < len(cont) and i in scores:
                            picks.append((at + j, cont[t], i, k))
                hidden.append(h)
                at += h.shape[0]
            hidden = torch.cat(hidden)
            for a in range(0, hidden.shape[0], LOGITS_ROWS):
                chunk = [p for p in picks if a <= p[0] < a + LOGITS_ROWS]
                if not chunk:
                    continue
                lp = self.runner.lm_head(hidden[a:a + LOGITS_ROWS]).float().log_softmax(-1)  # [n, V]
                at_rows = torch.tensor([p[0] - a for p in chunk], device=lp.device)
                toks = torch.tensor([p[1] for p in chunk], device=lp.device)
                for (_, _, i, k), value in zip(chunk, lp[at_rows, toks].tolist()):
                    scores[i][k] += value

        for _ in self._drive(on_scores):
            pass
        for i, s in scores.items():
            if normalize == "mean":
                s = [x / n for x, n in zip(s, lengths[i])]
            best = max(range(len(s)), key=s.__getitem__)
            results[i] = ChoiceScores(label=labels[best], scores=s, num_tokens=lengths[i])
        return results

    def _continuations(self, prompt, choices, separator: str, add_bos: bool):
        """(context tokens, [continuation tokens per choice]) for one prompt (see score_choices)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RowError("empty_prompt", "empty prompt")
            stripped = prompt.rstrip()
            tail = prompt[len(stripped):]  # trailing whitespace belongs to the continuation
            context = self._encode(stripped, add_bos=add_bos)
        else:
            context, stripped, tail = self._encode(prompt, add_bos=add_bos), None, ""
        continuations = []
        for c in choices:
            if not isinstance(c, str):
                cont = list(c)
                bad = [t for t in cont if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
                if bad:
                    raise RowError("invalid_choice", f"choice {c!r}: token ids outside the vocabulary: {bad[:5]}")
            elif stripped is None:
                raise RowError("invalid_prompt", "text choices need text prompts (the continuation is found in the text)")
            else:
                # as lm-evaluation-harness: what the whole text has beyond the prompt's token count
                cont = self.tokenizer.encode(stripped + tail + separator + c, add_bos=add_bos)[len(context):]
            if not cont:
                raise RowError("invalid_choice", f"choice {c!r} adds no tokens after the prompt")
            continuations.append(cont)
        longest = max(len(c) for c in continuations)
        if len(context) + longest > self.max_seq_len:
            raise RowError("prompt_too_long", f"prompt has {len(context)} tokens; with the longest choice ({longest}) it "
                             f"exceeds max_seq_len={self.max_seq_len}")
        return context, continuations

    def pin_prefix(self, prefix) -> int:
        """Compute a prefix every later row starts with (few-shot examples, instructions) and keep
        its full KV blocks for the engine's life: rows reuse them instead of recomputing them,
        whatever else passes through the cache. Returns the number of tokens pinned."""
        self._require_causal("pin_prefix")
        ids = self._encode(prefix)
        if len(ids) >= self.max_seq_len:
            raise ValueError(f"the prefix has {len(ids)} tokens; rows start with it, so it must be shorter than "
                             f"max_seq_len={self.max_seq_len} (use fewer or shorter examples, or a larger max_seq_len)")
        seq = Sequence(-1, ids, score_from=len(ids) - 1, cacheable_tokens=self._cacheable(ids))
        if not self.scheduler.add(seq):
            raise ValueError(f"the prefix has {len(ids)} tokens, more than the whole KV cache holds "
                             f"({self.scheduler.blocks.capacity * self.scheduler.bs} tokens): use fewer examples or "
                             "give the engine more KV memory")
        for _ in self._drive(lambda chunks: None):
            pass
        hashes = seq.block_hashes(min(len(ids), seq.cacheable_tokens) // self.scheduler.bs, self.scheduler.bs)
        blocks = self.scheduler.blocks.lookup(hashes)  # a reference each: never evicted
        self._pinned.extend(blocks)
        return len(blocks) * self.scheduler.bs

    # ---- classification --------------------------------------------------------------------
    @torch.inference_mode()
    def classify(self, texts, add_bos: bool = True) -> list[Classification]:
        """Label each text with a sequence-classification checkpoint: the head reads the hidden
        state of each row's last token. Rows are packed side by side, up to
        `prefill_token_budget` tokens per forward, with no padding: one large matmul per layer,
        attention within each row."""
        if not isinstance(self.model, PersimmonForSequenceClassification):
            raise TypeError("classify needs a PersimmonForSequenceClassification checkpoint")
        results: list[Classification | None] = [None] * len(texts)
        encoded = []
        for i, text in enumerate(texts):
            try:
                ids = self._encode(text, add_bos=add_bos)
                if len(ids) > self.config.max_position_embeddings:
                    raise RowError("prompt_too_long", f"text has {len(ids)} tokens, more than max_position_embeddings="
                                     f"{self.config.max_position_embeddings}")
                encoded.append((i, ids))
            except ValueError as e:
                results[i] = Classification(error=str(e), error_kind=_kind(e, "invalid_prompt"))
        for pack in token_budget_packs(encoded, lambda item: len(item[1]), self.prefill_token_budget):
            logits = self.runner.classify([row for _, row in pack]).float()
            for (i, _), row in zip(pack, logits):
                results[i] = self._label(row)
        return results

    def _label(self, logits: torch.Tensor) -> Classification:
        cfg = self.config
        if cfg.num_labels == 1 or cfg.problem_type == "regression":
            return Classification(label=cfg.id2label.get(0, "LABEL_0"), score=logits[0].item(),
                                  probs=logits.tolist())
        probs = logits.sigmoid() if cfg.problem_type == "multi_label_classification" else logits.softmax(-1)
        best = int(probs.argmax())
        return Classification(label=cfg.id2label.get(best, f"LABEL_{best}"), score=probs[best].item(),
                              probs=probs.tolist())


def generate_tensor(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False,
                    temperature=1.0, top_k=None, top_p=None, eos_token_id=None, pad_token_id=None, seed=None):
    """transformers-style `generate` on the engine: [B, T] (left- or right-padded with a mask) in,
    [B, T + new] out, rows that stop early padded with pad_token_id (eos when unset)."""
    cfg = model.config
    eos = cfg.eos_ids() if eos_token_id is None else (
        list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                         else (eos[0] if eos else 0))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_k=top_k or 0, top_p=top_p or 1.0, stop_token_ids=eos, ignore_eos=True,
                            seed=seed)
    engine = Engine(model, None, max_batch_size=input_ids.shape[0],
                    max_seq_len=input_ids.shape[1] + max_new_tokens)
    completions = engine.generate(prompts, params)
    for c in completions:
        if c.error:
            raise ValueError(c.error)
    new = max(len(c.token_ids) for c in completions)
    out = torch.full((input_ids.shape[0], new), pad, dtype=input_ids.dtype)
    for row, c in enumerate(completions):
        out[row, :len(c.token_ids)] = torch.tensor(c.token_ids, dtype=input_ids.dtype)
    return torch.cat([input_ids, out.to(input_ids.device)], dim=1)
