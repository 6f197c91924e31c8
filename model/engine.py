"""The engine: batched, KV-cached generation with continuous batching, plus scoring.

vLLM in miniature, three parts:
- `Runner` owns the model and the static KV cache; it runs prefill (prompts packed side by
  side into their cache slots, or padded groups after a shared prefix) and decode (one token for a set of slots) and returns only the logits the
  step needs: the 262k-vocab head is applied to the last position of each row, never [B, T, V].
- the scheduler loop in `Engine.generate` admits waiting prompts into free slots, decodes all
  running rows one token per step, retires finished rows and refills their slots at once;
- the sampler (model/sampling.py) turns logits into tokens.
A prompt prefix shared by every prompt of a call (few-shot instructions) is prefilled once into a
spare slot and copied into each row's slot, so only each row's own suffix is computed.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import torch

from .checkpoint import load_pretrained, resolve_dtype
from .config import PersimmonConfig
from .modeling import KVCache, PersimmonForCausalLM, PersimmonForSequenceClassification, PersimmonMLP
from .sampling import SamplingParams, sample

MIN_SHARED_PREFIX = 8  # tokens; shorter common prefixes are not worth a copy
ATTENTION_CHUNK = 8  # decode rows per attention call (each call reads keys up to its own longest row)
DECODE_MODES = ("dynamic", "static", "cuda_graph")


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "error"  # "stop" | "length" | "error"
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    logprobs: list[float] | None = None
    error: str | None = None


@dataclass
class Classification:
    label: str | None = None
    score: float | None = None  # probability of `label` (the value itself for regression)
    probs: list[float] | None = None
    error: str | None = None


@dataclass
class ChoiceScores:
    label: str | None = None  # the most likely choice
    scores: list[float] | None = None  # total log-likelihood of each choice, in `choices` order
    error: str | None = None


@dataclass
class _Request:
    index: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    stop_ids: set
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    slot: int = -1

    @property
    def position(self) -> int:  # position of the next token to feed (the last sampled one)
        return len(self.prompt) + len(self.output) - 1


class Runner:
    """Model + static KV cache. Slots 0..max_batch_size-1 hold rows; one extra slot holds a
    shared prefix."""

    def __init__(self, model, max_batch_size: int, max_seq_len: int, decode_mode: str = "dynamic"):
        self.model, self.config = model, model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.prefix_slot = max_batch_size
        cfg, itemsize = self.config, torch.empty((), dtype=self.dtype).element_size()
        need = 2 * cfg.num_hidden_layers * (max_batch_size + 1) * max_seq_len * cfg.hidden_size * itemsize
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            if need > 0.9 * free:
                raise ValueError(f"the KV cache for max_batch_size={max_batch_size} x max_seq_len={max_seq_len} "
                                 f"needs {need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of GPU memory "
                                 f"is free: lower max_batch_size or max_seq_len")
        self.cache = KVCache(self.config, max_batch_size + 1, max_seq_len, self.dtype, self.device)
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        if decode_mode == "cuda_graph" and self.device.type != "cuda":
            raise ValueError("decode_mode='cuda_graph' needs the model on a CUDA device")
        if decode_mode != "dynamic" and self.config.rope_type == "dynamic":
            decode_mode = "dynamic"  # dynamic NTK rope depends on each row's position: no static shapes
        self.decode_mode = decode_mode
        # static decode: all slots every step, attention over a power-of-two bucket of positions
        self.buckets = sorted({min(max_seq_len, 2 ** i) for i in range(7, max(8, math.ceil(math.log2(max_seq_len)) + 1))})
        self._graphs: dict[int, tuple] = {}

    def _tensor(self, rows):
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, slots: list[int], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run each row's tokens at positions start.. into its slot. Rows are right-padded to a
        common length; padding writes past a row's end, where decode overwrites it before any
        query can see it. Returns hidden states at each row's last token [B, C]."""
        T = max(len(t) for t in tokens)
        ids = self._tensor([t + [0] * (T - len(t)) for t in tokens])  # [B, T]
        pos = self._tensor(starts)[:, None] + torch.arange(T, device=self.device)  # [B, T]
        pos = pos.clamp(max=self.max_seq_len - 1)
        h = self.model.model(ids, position_ids=pos, kv_cache=self.cache, cache_slots=self._tensor(slots),
                             kv_len=min(max(starts) + T, self.max_seq_len))
        last = self._tensor([len(t) - 1 for t in tokens])
        return h[torch.arange(len(tokens), device=self.device), last]  # [B, C]

    @torch.inference_mode()
    def prefill_packed(self, slots: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Prefill whole prompts (from position 0) side by side as one [1, N] sequence: the
        linear layers see one large matrix, attention stays within each prompt, no padding.
        Returns hidden states at each prompt's last token [B, C]."""
        ids, pos, segments = packed_inputs(tokens, self.device)
        token_slots = self._tensor([s for s, row in zip(slots, tokens) for _ in row])[None]
        h = self.model.model(ids, position_ids=pos, kv_cache=self.cache, cache_slots=token_slots,
                             segments=segments)
        return h[0, self._tensor([e - 1 for _, e in segments])]  # [B, C]

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each given slot. Returns hidden states [len(slots), C]."""
        if self.decode_mode != "dynamic":
            return self._decode_static(slots, tokens, positions)
        n = max(slots) + 1
        if len(slots) == n or len(slots) * 2 >= n:
            # rows cover (most of) slots 0..n-1: run them all as a contiguous view, no KV gather;
            # idle slots compute a throwaway token at position 0 of their own (free) cache row
            all_tokens, all_pos = [0] * n, [0] * n
            for s, t, p in zip(slots, tokens, positions):
                all_tokens[s], all_pos[s] = t, p
            h = self.model.model(self._tensor(all_tokens)[:, None], position_ids=self._tensor(all_pos)[:, None],
                                 kv_cache=self.cache, cache_slots=slice(0, n), kv_chunks=self._kv_chunks(all_pos))
            return h[self._tensor(slots), 0]
        h = self.model.model(self._tensor(tokens)[:, None], position_ids=self._tensor(positions)[:, None],
                             kv_cache=self.cache, cache_slots=self._tensor(slots), kv_len=max(positions) + 1)
        return h[:, 0]

    @staticmethod
    def _kv_chunks(positions: list[int]) -> list[tuple[int, int, int]]:
        """Decode attention in runs of ATTENTION_CHUNK rows, each over its own longest row's
        keys: the KV cache read is memory-bound, and with slots filled in prompt-length order
        short rows no longer read up to the batch's longest position (~25% fewer bytes on
        prompts of mixed length). Adjacent runs of equal length merge."""
        chunks: list[tuple[int, int, int]] = []
        for a in range(0, len(positions), ATTENTION_CHUNK):
            b = min(a + ATTENTION_CHUNK, len(positions))
            n = max(positions[a:b]) + 1
            if chunks and chunks[-1][2] == n:
                chunks[-1] = (chunks[-1][0], b, n)
            else:
                chunks.append((a, b, n))
        return chunks

    def _static_step(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Decode over every slot with fixed shapes: tokens, positions [max_batch, 1] -> [max_batch, C]."""
        h = self.model.model(tokens, position_ids=positions, kv_cache=self.cache,
                             cache_slots=slice(0, self.max_batch_size), kv_len=kv_len)
        return h[:, 0]

    def _decode_static(self, slots, tokens, positions) -> torch.Tensor:
        kv_len = next(b for b in self.buckets if b >= max(positions) + 1)
        all_tokens, all_pos = [0] * self.max_batch_size, [0] * self.max_batch_size
        for s, t, p in zip(slots, tokens, positions):
            all_tokens[s], all_pos[s] = t, p
        tok, pos = self._tensor(all_tokens)[:, None], self._tensor(all_pos)[:, None]
        if self.decode_mode == "static":
            return self._static_step(tok, pos, kv_len)[self._tensor(slots)]
        graph, static_tok, static_pos, out = self._graphs[kv_len]
        static_tok.copy_(tok)
        static_pos.copy_(pos)
        graph.replay()
        return out[self._tensor(slots)]

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Record one CUDA graph of the static decode step per attention bucket. Must run while
        no row is live: warm-up and capture write throwaway keys at position 0 of every slot."""
        if self.decode_mode != "cuda_graph" or self._graphs:
            return
        pool = None
        for kv_len in self.buckets:
            tok = torch.zeros(self.max_batch_size, 1, dtype=torch.long, device=self.device)
            pos = torch.zeros_like(tok)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up outside the graph (allocator, kernels selection)
                    self._static_step(tok, pos, kv_len)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._static_step(tok, pos, kv_len)
            pool = graph.pool()
            self._graphs[kv_len] = (graph, tok, pos, out)

    def copy_prefix(self, slots: list[int], length: int) -> None:
        self.cache.copy_prefix(self.prefix_slot, self._tensor(slots), length)


def pack_cpu_linears(model) -> None:
    """CPU only: run every Linear through oneDNN with its weight pre-packed once into oneDNN's
    blocked layout (as torch.compile's CPU backend does). Small decode batches multiply
    1.4-2x faster than with the default BLAS call. The MLP's ReLU runs inside its first
    matmul and the square in place (bit-identical; saves two passes and a fresh [tokens,
    intermediate] buffer, ~10% of a long prefill). Parameters keep their names and values (the
    packed copy is extra memory, one model's worth); `unpack_cpu_linears` undoes it."""

    def packed_linear(module, activation="none"):
        weight, bias = module.weight, module.bias
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)

        def forward(x):
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, activation, [], "")
            return y.view(*x.shape[:-1], weight.shape[0])
        return forward

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = packed_linear(module)
            elif isinstance(module, PersimmonMLP):
                up_relu, down = packed_linear(module.dense_h_to_4h, "relu"), module.dense_4h_to_h

                def mlp_forward(x, up_relu=up_relu, down=down):
                    return down(up_relu(x).square_())  # relu(x W1 + b1)^2 W2 + b2

                module.forward = mlp_forward


def unpack_cpu_linears(model) -> None:
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, PersimmonMLP)):
            module.__dict__.pop("forward", None)


def packed_inputs(rows: list[list[int]], device):
    """Token lists side by side as one sequence: ids [1, N], positions [1, N] (each row from 0)
    and each row's (start, end) segment, for the model's packed mode."""
    ids = torch.tensor([t for row in rows for t in row], dtype=torch.long, device=device)[None]
    pos = torch.cat([torch.arange(len(row), device=device) for row in rows])[None]
    ends = list(itertools.accumulate(len(row) for row in rows))
    return ids, pos, list(zip([0] + ends[:-1], ends))


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


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


class Engine:
    """Holds one Persimmon replica and a preallocated KV cache for `max_batch_size` rows of up
    to `max_seq_len` tokens each."""

    def __init__(self, model, tokenizer=None, *, max_batch_size: int = 32, max_seq_len: int | None = None,
                 dtype=None, device=None, prefill_token_budget: int = 4096, decode_mode: str | None = None,
                 packed_cpu_linears: bool | None = None):
        dtype = resolve_dtype(dtype)
        unpack_cpu_linears(model)  # packed copies from an earlier engine would go stale on a cast
        if dtype is not None or device is not None:
            model = model.to(dtype=dtype, device=device)
        self.model = model.eval()
        self.config: PersimmonConfig = model.config
        if packed_cpu_linears is None:
            packed_cpu_linears = next(model.parameters()).device.type == "cpu" and torch.backends.mkldnn.is_available()
        if packed_cpu_linears:
            pack_cpu_linears(model)
        self.tokenizer = tokenizer
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len or min(self.config.max_position_embeddings, 4096)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        self.prefill_token_budget = prefill_token_budget
        # decode_mode: "dynamic" (shapes follow the live rows; the CPU default), "static" (all
        # slots, bucketed attention length) or "cuda_graph" (static, replayed from CUDA graphs;
        # the CUDA default)
        on_cuda = next(self.model.parameters()).device.type == "cuda"
        self.decode_mode = decode_mode or ("cuda_graph" if on_cuda else "dynamic")
        self._runner = None  # built on first generate / score call

    @classmethod
    def from_pretrained(cls, path, *, max_batch_size: int = 32, max_seq_len: int | None = None,
                        dtype=None, device=None, **kwargs) -> "Engine":
        """Load model (the class config.json names) and tokenizer from an HF-layout directory.
        device None = CUDA when available, else CPU."""
        from .tokenizer import PersimmonTokenizer

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_pretrained(path, dtype=dtype, device=device)
        tokenizer = None
        if os.path.isfile(os.path.join(os.fspath(path), "tokenizer.model")):
            tokenizer = PersimmonTokenizer.from_pretrained(path)
        return cls(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, **kwargs)

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = Runner(self.model, self.max_batch_size, self.max_seq_len, self.decode_mode)
        return self._runner

    # ---- input handling --------------------------------------------------------------------
    def _encode(self, prompt, add_bos=True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass token-id lists")
            if not prompt.strip():
                raise ValueError("empty prompt")
            return self.tokenizer.encode(prompt, add_bos=add_bos)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("empty prompt")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
        return list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""

    def _stop_ids(self, params: SamplingParams) -> set:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
                ids.add(self.tokenizer.eos_token_id)
            ids.update(self.config.eos_ids())
        return ids

    # ---- generation ------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Complete every prompt; results in input order. Bad rows get finish_reason "error"."""
        params = params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        results: list[Completion | None] = [None] * len(prompts)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                ids = self._encode(prompt)
                room = self.max_seq_len - 1  # at least one new token must fit
                if len(ids) > room:
                    if p.truncate != "left":
                        raise ValueError(f"prompt has {len(ids)} tokens, more than the {room} this engine's "
                                         f"max_seq_len={self.max_seq_len} allows (use truncate='left')")
                    ids = ids[-max(1, self.max_seq_len - p.max_new_tokens):]
            except ValueError as e:
                results[i] = Completion(error=str(e), finish_reason="error",
                                        num_prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
                continue
            gen = None
            if not p.greedy:
                gen = torch.Generator(device=self.runner.device)
                gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, ()).item()))
            requests.append(_Request(i, ids, p, gen, self._stop_ids(p)))
        for req in self._run(requests):
            results[req.index] = self._completion(req)
        return results

    def _completion(self, req: _Request) -> Completion:
        ids = req.output
        body = ids[:-1] if req.finish_reason == "stop" and ids and ids[-1] in req.stop_ids else ids
        text = req.text if req.text is not None else self._decode(body)
        return Completion(text=text, token_ids=list(ids), finish_reason=req.finish_reason,
                          num_prompt_tokens=len(req.prompt), num_generated_tokens=len(ids),
                          logprobs=list(req.logprobs) if req.params.logprobs else None)

    def _run(self, requests: list[_Request]):
        """The continuous-batching loop. Yields requests as they finish."""
        runner = self.runner
        waiting = list(reversed(requests))  # pop() takes the next in input order
        free = list(range(self.max_batch_size - 1, -1, -1))  # pop() takes the lowest slot
        running: dict[int, _Request] = {}
        runner.capture_graphs()  # no-op unless decode_mode is cuda_graph; before any row is live
        prefix_len = self._prefill_shared_prefix([r.prompt for r in requests])

        while waiting or running:
            admitted = []
            while waiting and len(admitted) < len(free):
                admitted.append(waiting.pop())
            # lowest free slots to the shortest prompts: neighbouring slots then hold rows of
            # similar length, which decode attention exploits (Runner._kv_chunks)
            for req, slot in zip(sorted(admitted, key=lambda r: len(r.prompt)), sorted(free)[:len(admitted)]):
                req.slot = slot
            taken = {r.slot for r in admitted}
            free = [s for s in free if s not in taken]
            if prefix_len == 0:
                for group in self._packed_groups(admitted):
                    self._step(group, runner.prefill_packed([r.slot for r in group], [r.prompt for r in group]))
            else:
                for group in self._prefill_groups(admitted):
                    start = min(prefix_len, min(len(r.prompt) for r in group) - 1)
                    if start > 0:
                        runner.copy_prefix([r.slot for r in group], start)
                    h = runner.prefill([r.slot for r in group], [r.prompt[start:] for r in group],
                                       [start] * len(group))
                    self._step(group, h)
            for req in admitted:
                running[req.slot] = req
            done = [r for r in running.values() if r.finish_reason]
            for req in done:
                del running[req.slot]
                free.append(req.slot)
                yield req
            free.sort(reverse=True)
            if not running:
                continue
            rows = sorted(running.values(), key=lambda r: r.slot)
            h = runner.decode([r.slot for r in rows], [r.output[-1] for r in rows], [r.position for r in rows])
            self._step(rows, h)
            for req in rows:
                if req.finish_reason:
                    del running[req.slot]
                    free.append(req.slot)
                    yield req
            free.sort(reverse=True)

    def _prefill_shared_prefix(self, prompts: list[list[int]]) -> int:
        if len(prompts) < 2:
            return 0
        if self.config.rope_type == "dynamic" and max(len(p) for p in prompts) > self.config.max_position_embeddings:
            return 0  # dynamic NTK: a prompt's keys depend on its whole length, a prefix's would not
        n = min(_common_prefix(prompts), min(len(p) for p in prompts) - 1)
        if n < MIN_SHARED_PREFIX:
            return 0
        self.runner.prefill([self.runner.prefix_slot], [prompts[0][:n]], [0])
        return n

    def _packed_groups(self, reqs: list[_Request]):
        """Admitted prompts in input order, cut into packs of at most prefill_token_budget tokens."""
        return token_budget_packs(reqs, lambda r: len(r.prompt), self.prefill_token_budget)

    def _prefill_groups(self, reqs: list[_Request]):
        """Group admitted prompts by length so padding stays small and each group fits the
        prefill token budget."""
        reqs = sorted(reqs, key=lambda r: len(r.prompt))
        group: list[_Request] = []
        for req in reqs:
            n = len(req.prompt)
            if group and (n * (len(group) + 1) > self.prefill_token_budget or n > 1.25 * len(group[0].prompt) + 8):
                yield group
                group = []
            group.append(req)
        if group:
            yield group

    def _step(self, rows: list[_Request], hidden: torch.Tensor) -> None:
        """Sample one token per row from its last hidden state and check stop conditions."""
        logits = self.model.lm_head(hidden)  # [B, V], only the positions that are sampled
        tokens, logprobs = sample(logits, [r.params for r in rows], [r.generator for r in rows])
        tokens = tokens.tolist()
        logprobs = logprobs.tolist() if logprobs is not None else None
        for i, (req, tok) in enumerate(zip(rows, tokens)):
            req.output.append(tok)
            if logprobs is not None:
                req.logprobs.append(logprobs[i])
            if tok in req.stop_ids:
                req.finish_reason = "stop"
            elif req.params.stop and self._hit_stop_string(req):
                req.finish_reason = "stop"
            elif len(req.output) >= req.params.max_new_tokens or req.position + 1 >= self.max_seq_len:
                req.finish_reason = "length"

    def _hit_stop_string(self, req: _Request) -> bool:
        text = self._decode(req.output)
        hits = [i for i in (text.find(s) for s in req.params.stop) if i >= 0]
        if hits:
            req.text = text[:min(hits)]
            return True
        return False

    # ---- scoring ---------------------------------------------------------------------------
    @torch.inference_mode()
    def score_choices(self, prompts, choices: list[str], add_bos: bool = True) -> list[ChoiceScores]:
        """Total log-likelihood of each choice continuation after each prompt.

        Continuation tokens are `tokenizer.encode(choice, add_bos=False)`. Prompts run in groups:
        each prompt is prefilled once (a prefix shared by all prompts, such as few-shot
        instructions, once per call), its KV is copied to one cache slot per choice, and all
        (prompt, choice) rows of the group then run as one batch. The head is applied only at
        the positions that predict a choice token. With dynamic NTK rope past
        max_position_embeddings, the reused prompt keys keep the frequencies of the prompt's
        length (as in cached generation), so scores differ slightly from one full forward."""
        if not isinstance(self.model, PersimmonForCausalLM):
            raise TypeError("score_choices needs a causal LM checkpoint (PersimmonForCausalLM)")
        if not choices:
            raise ValueError("score_choices needs at least one choice")
        if len(choices) > self.max_batch_size:
            raise ValueError(f"{len(choices)} choices exceed max_batch_size={self.max_batch_size}")
        choice_ids = []
        for c in choices:
            ids = self.tokenizer.encode(c, add_bos=False) if isinstance(c, str) and self.tokenizer else c
            if isinstance(c, str) and self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass choices as token-id lists")
            if not ids:
                raise ValueError(f"choice {c!r} encodes to no tokens")
            choice_ids.append(list(ids))
        labels = [c if isinstance(c, str) else str(c) for c in choices]
        K, longest = len(choice_ids), max(len(c) for c in choice_ids)
        results: list[ChoiceScores | None] = [None] * len(prompts)
        encoded = []
        for i, prompt in enumerate(prompts):
            try:
                ids = self._encode(prompt, add_bos=add_bos)
                if len(ids) + longest > self.max_seq_len:
                    raise ValueError(f"prompt has {len(ids)} tokens; with the longest choice "
                                     f"({longest}) it exceeds max_seq_len={self.max_seq_len}")
                encoded.append((i, ids))
            except ValueError as e:
                results[i] = ChoiceScores(error=str(e))
        if not encoded:
            return results
        runner = self.runner
        prefix_len = self._prefill_shared_prefix([ids for _, ids in encoded])
        group_size = self.max_batch_size // K
        # rows of a group: prompt g, choice k -> slot g*K + k; the prompt itself is prefilled in slot g*K
        choice_rows = [c + [0] * (longest - len(c)) for c in choice_ids]
        # the head runs at (row, j) for j < len(choice)-1: position j predicts choice token j+1
        picks = [(k, j) for k, c in enumerate(choice_ids) for j in range(len(c) - 1)]
        for g0 in range(0, len(encoded), group_size):
            group = encoded[g0:g0 + group_size]
            base = [g * K for g in range(len(group))]
            start = min(prefix_len, min(len(ids) for _, ids in group) - 1)
            if start > 0:
                runner.copy_prefix(base, start)
            h = runner.prefill(base, [ids[start:] for _, ids in group], [start] * len(group))
            first = self.model.lm_head(h).float().log_softmax(-1)  # [G, V]: predicts each choice's 1st token
            for slot, (_, ids) in zip(base, group):
                if K > 1:
                    runner.cache.copy_prefix(slot, runner._tensor(list(range(slot + 1, slot + K))), len(ids))
            n = len(group) * K
            tok = runner._tensor(choice_rows * len(group))  # [G*K, longest]
            starts = runner._tensor([len(ids) for _, ids in group for _ in range(K)])
            pos = starts[:, None] + torch.arange(longest, device=runner.device)  # [G*K, longest]
            hc = self.model.model(tok, position_ids=pos, kv_cache=runner.cache, cache_slots=slice(0, n),
                                  kv_len=max(len(ids) for _, ids in group) + longest)
            later = None
            if picks:
                rows = runner._tensor([g * K + k for g in range(len(group)) for k, _ in picks])
                cols = runner._tensor([j for _ in group for _, j in picks])
                targets = runner._tensor([choice_ids[k][j + 1] for _ in group for k, j in picks])
                lp = self.model.lm_head(hc[rows, cols]).float().log_softmax(-1)  # [N, V], N = needed positions
                later = lp.gather(-1, targets[:, None])[:, 0].tolist()
            for g, (i, _) in enumerate(group):
                scores = [first[g, c[0]].item() for c in choice_ids]
                if later is not None:
                    for n_pick, (k, _) in enumerate(picks):
                        scores[k] += later[g * len(picks) + n_pick]
                best = max(range(K), key=scores.__getitem__)
                results[i] = ChoiceScores(label=labels[best], scores=scores)
        return results

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
                    raise ValueError(f"text has {len(ids)} tokens, more than max_position_embeddings="
                                     f"{self.config.max_position_embeddings}")
                encoded.append((i, ids))
            except ValueError as e:
                results[i] = Classification(error=str(e))
        device = self.runner.device if self._runner else next(self.model.parameters()).device
        for pack in token_budget_packs(encoded, lambda item: len(item[1]), self.prefill_token_budget):
            # rows side by side as one [1, N] sequence, each attending to itself only
            ids, pos, segments = packed_inputs([row for _, row in pack], device)
            h = self.model.model(ids, position_ids=pos, segments=segments)
            logits = self.model.score(h[0, torch.tensor([e - 1 for _, e in segments], device=device)]).float()
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
