"""The engine: batched, KV-cached generation with continuous batching over a paged KV cache,
plus choice scoring and classification (model/scoring.py). vLLM in miniature; each step of
`generate` is: schedule (model/scheduler.py: which rows decode or prefill, by free KV blocks,
and which is preempted), execute (model/model_runner.py: one packed forward, hidden states only
where a token is sampled or scored), sample (model/sampling.py, under the grammar masks of
model/structured.py; log-probabilities from the raw logits, model/logprobs.py), update and
output (model/outputs.py: stop ids, length limits, stop strings).
"""

from __future__ import annotations

import os
import random

import torch

from . import scoring
from .checkpoint import load_pretrained, resolve_dtype
from .config import PersimmonConfig
from .cpu_packing import unpack_cpu_linears
from .logprobs import prompt_logprobs, step_logprobs
from .model_runner import ModelRunner
from .modeling import PersimmonForCausalLM
from .outputs import Completion, OutputProcessor, RowError, error_kind
from .quantization import quantization_of
from .sampling import Sampler
from .sampling_params import SamplingParams
from .scheduler import BlockManager, Scheduler, Sequence
from .structured import Grammars
from .tokenizer import PersimmonTokenizer


class Engine:
    """One Persimmon replica: model, tokenizer, KV pool, scheduler and sampler.

    The engine casts / moves the model in place and packs its CPU weights: build one engine per
    model (an earlier engine whose model a later one re-cast refuses to run).

    Args:
        max_batch_size: most rows in flight at once (a cap, not a reservation).
        max_seq_len: most tokens (prompt + generated) per row; default max_position_embeddings.
        prefill_token_budget: most prompt tokens in one forward (longer prompts are prefilled in
            chunks across steps); bounds activation memory.
        kv_cache_gib: size of the KV pool; None = `memory_fraction` of the device memory free
            after the weights load, times `memory_share`, less activation headroom (model/capacity.py).
        kv_block_size: tokens per KV block.
        prefix_caching: share the KV blocks of identical leading tokens between rows and calls.
        decode_mode: "dynamic" (CPU default), "static" (fixed shapes, eager) or "cuda_graph" (CUDA default).
        packed_cpu_linears: oneDNN-packed Linear weights on CPU; None: where this CPU supports them
            (model.cpu_packing), True where unsupported: a ValueError saying why.
    """

    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 256, max_seq_len: int | None = None,
                 dtype=None, device=None, prefill_token_budget: int = 4096, kv_cache_gib: float | None = None,
                 memory_fraction: float = 0.9, memory_share: float = 1.0, kv_block_size: int = 16,
                 prefix_caching: bool = True, decode_mode: str | None = None,
                 packed_cpu_linears: bool | None = None):
        dtype = resolve_dtype(dtype)
        quantized, _ = quantization_of(model)
        if quantized != "none" and dtype not in (None, next(model.parameters()).dtype):
            raise ValueError(f"this model's linears are quantized ({quantized}) from {next(model.parameters()).dtype}: "
                             f"load it in {dtype} instead of casting it")
        if quantized != "none":
            dtype = None  # its own dtype: a cast would turn fp8's float32 scales into that dtype
        unpack_cpu_linears(model)  # packed weights from an earlier engine would go stale on a cast
        if dtype is not None or device is not None:
            model = model.to(dtype=dtype, device=device)
        self.model = model.eval()
        self.config: PersimmonConfig = model.config
        self.tokenizer = tokenizer
        self.max_seq_len = self.config.max_position_embeddings if max_seq_len is None else max_seq_len
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
                                       chunked_prefill=self.config.rope_type != "dynamic")
        self.sampler = Sampler()
        self.outputs = OutputProcessor(tokenizer.decode if tokenizer is not None else None,
                                       tokenizer.token_text if tokenizer is not None else None)
        self.grammars: Grammars | None = None  # built on the first structured row (~1 s for 262k tokens)
        self._pinned: list[int] = []  # KV blocks held by pin_prefix

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device=None, quantization: str = "none",
                        quantize_lm_head: bool = False, **kwargs) -> "Engine":
        """Load model (the class config.json names) and tokenizer from an HF-layout directory.
        device None = CUDA when available. `quantization` "int8" / "fp8" quantizes the layers'
        linears while they load (model/quantization.py). kwargs go to Engine()."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_pretrained(path, dtype=dtype, device=device, quantization=quantization,
                                quantize_lm_head=quantize_lm_head)
        tokenizer = None
        if os.path.isfile(os.path.join(os.fspath(path), "tokenizer.model")):
            tokenizer = PersimmonTokenizer.from_pretrained(path)
        return cls(model, tokenizer, **kwargs)

    def stats(self) -> dict:
        """Sizing facts and counters since the engine was built."""
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
            raise RowError("invalid_prompt",
                           f"token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        return list(prompt)

    def _stop_ids(self, params: SamplingParams) -> frozenset:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                ids.add(self.tokenizer.eos_token_id)
            ids.update(self.config.eos_ids())
        return frozenset(ids)

    def _cacheable(self, prompt: list[int]) -> int:
        """Tokens whose KV blocks may be shared: all, but past max_position_embeddings with dynamic NTK."""
        if self.config.rope_type != "dynamic":
            return 1 << 62
        limit = self.config.max_position_embeddings
        return limit if len(prompt) <= limit else 0

    def _require_causal(self, what: str) -> None:
        if not isinstance(self.model, PersimmonForCausalLM):
            raise TypeError(f"{what} needs a causal LM checkpoint (PersimmonForCausalLM)")

    # ---- the loop --------------------------------------------------------------------------
    def _run(self, on_hidden=None):
        """Step until every queued row is done, yielding rows as they finish; `on_hidden(chunks)`
        gets each step's hidden states of scoring rows, [(row, [n, C])]."""
        param = next(self.model.parameters())
        if (param.dtype, param.device) != (self.runner.dtype, self.runner.device):
            self._abort()
            raise RuntimeError(f"this engine's model was moved to {param.dtype} on {param.device} after the engine "
                               f"was built for {self.runner.dtype} on {self.runner.device} (by another Engine on "
                               "the same model?): build one engine per model")
        try:
            while self.scheduler.has_work():
                yield from self._step(on_hidden)
        except BaseException:
            self._abort()
            raise

    def _step(self, on_hidden) -> list[Sequence]:
        step = self.scheduler.schedule()
        if not step.items:
            raise RuntimeError(f"scheduler made no progress (a bug): {len(self.scheduler.waiting)} waiting, "
                               f"{len(self.scheduler.running)} running")
        sampling = [item.seq for item in step.items if item.sample]
        masks = self.grammars.masks_async(sampling) if self.grammars is not None else None
        hidden = self.runner.execute(step)  # the grammar masks are filled meanwhile
        scoring_rows, prompt_rows, sample_at, at = [], [], [], 0
        for item in step.items:
            if item.outputs_from is not None:
                end = item.start + item.num_tokens
                if item.seq.score_from is not None:
                    scoring_rows.append((item.seq, hidden[at:at + end - item.outputs_from]))
                else:  # prompt log-probabilities: the positions that predict a prompt token
                    prompt_rows.append((item.seq, at, item.outputs_from, min(end, len(item.seq.prompt) - 1)))
                at += end - item.outputs_from
                if item.sample:  # the last of them is the sampled position
                    sample_at.append(at - 1)
            elif item.sample:
                sample_at.append(at)
                at += 1
        if scoring_rows:
            on_hidden(scoring_rows)
        if prompt_rows:
            prompt_logprobs(self.model.lm_head, hidden, prompt_rows)
        tokens, logprobs, ended = [], None, []  # ended: (row, reason) the output step ends
        if sampling:
            logits = self.model.lm_head(hidden[torch.tensor(sample_at, device=hidden.device)])
            raw = logits  # the model's own distribution: grammar masks and the sampler make new tensors
            if masks is not None:
                logits, dead = self.grammars.apply(logits, sampling, masks.result())
                ended = [(s, "error") for s in dead]
            tokens = self.sampler(logits, [s.params for s in sampling], [s.seed for s in sampling],
                                  [len(s.output) for s in sampling])
            logprobs = step_logprobs(raw, sampling, tokens)
        finished = self.scheduler.update(step, tokens, logprobs)
        if masks is not None:
            ended += self.grammars.advance(sampling, dead=[s for s, _ in ended])
        ended += [(s, "stop") for s in self.outputs.stop_strings(sampling)]
        for seq, reason in ended:
            if self.scheduler.finish(seq, reason):
                finished.append(seq)
        return finished

    def _abort(self) -> None:  # after an exception: nothing half-done leaks into the next call
        self.scheduler.abort_all()
        self.outputs.clear()

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
        try:
            results = [self._queue(i, prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
        except BaseException:
            self._abort()
            raise
        for seq in self._run():
            results[seq.index] = self.outputs.completion(seq)
        return results

    def _queue(self, i: int, prompt, p: SamplingParams) -> Completion | None:
        """Queue row i; its error Completion when it cannot run."""
        try:
            ids = self._fit_prompt(self._encode(prompt), p)
        except ValueError as e:
            return Completion(error=str(e), error_kind=error_kind(e, "invalid_prompt"),
                              num_prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
        seed = p.seed if p.seed is not None else random.getrandbits(62)
        seq = Sequence(i, ids, p, self._stop_ids(p), seed=seed, cacheable_tokens=self._cacheable(ids))
        if p.constrained:
            try:
                self._grammars().start(seq)
            except ValueError as e:  # the row's own schema / regex: a setting, not its prompt
                return Completion(error=str(e), error_kind=error_kind(e, "invalid_sampling"),
                                  num_prompt_tokens=len(ids))
        if not self.scheduler.add(seq):
            return Completion(error=seq.error, error_kind=seq.error_kind, num_prompt_tokens=len(ids))
        self.outputs.add(seq)
        return None

    def _grammars(self) -> Grammars:
        if self.tokenizer is None:
            raise ValueError("structured output needs an engine with a tokenizer")
        if self.grammars is None:
            eos = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.config.eos_ids()[0]
            self.grammars = Grammars(self.tokenizer, self.config.vocab_size, eos)
        return self.grammars

    def _fit_prompt(self, ids: list[int], p: SamplingParams) -> list[int]:
        """The prompt, or with truncate='left' its tail: room for max_new_tokens, at least max_seq_len / 2."""
        room = self.max_seq_len - 1  # at least one new token must fit
        if len(ids) <= room:
            return ids
        if p.truncate != "left":
            raise RowError("prompt_too_long", f"prompt has {len(ids)} tokens, more than the {room} this engine's "
                             f"max_seq_len={self.max_seq_len} allows (use truncate='left')")
        keep = max(self.max_seq_len - p.max_new_tokens, self.max_seq_len // 2, 1)
        return ids[-min(keep, room):]

    def pin_prefix(self, prefix) -> int:
        """Compute a prefix later rows start with (few-shot examples, instructions) and keep its
        full KV blocks for the engine's life; returns the number of tokens pinned."""
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
        for _ in self._run(lambda chunks: None):
            pass
        hashes = seq.block_hashes(min(len(ids), seq.cacheable_tokens) // self.scheduler.bs, self.scheduler.bs)
        blocks = self.scheduler.blocks.lookup(hashes)  # a reference each: never evicted
        self._pinned.extend(blocks)
        return len(blocks) * self.scheduler.bs

    # ---- scoring and classification: model/scoring.py ---------------------------------------
    score_choices = scoring.score_choices
    score = scoring.score
    classify = scoring.classify
