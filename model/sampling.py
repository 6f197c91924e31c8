"""Sampling parameters and the batched sampler: temperature 0 is greedy; top-k / top-p per row.

One sampler call handles every row of a step at once (per-row temperature, top-k and top-p as
tensors). Randomness is counter-based: a sampled row's n-th token uses one uniform number
derived from (its seed, n) and inverse-CDF sampling over its filtered distribution. A seeded
row therefore draws the same tokens whatever rows share its batch, whichever table row it
holds, and whether or not it was preempted and recomputed on the way; no generator state
travels with it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch


MIN_TEMPERATURE = 1e-5
SAMPLE_ROWS = 32  # sampled rows filtered at once: bounds the sampler's [rows, vocab] temporaries


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: list[str] = field(default_factory=list)  # stop strings, trimmed from the text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past the model's eos token
    seed: int | None = None
    logprobs: bool = False  # return the log-probability of each generated token
    truncate: str | None = None  # None: over-long prompts are an error; "left": keep the tail
    # structured output (one at a time): the completion must match (model/structured.py)
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"SamplingParams.{name} must be {want}, got {getattr(self, name)!r}")

        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) for x in self.stop):
            bad("stop", "a string or a list of strings")
        self.stop = [x for x in self.stop if x]
        ids = self.stop_token_ids or []
        if not isinstance(ids, (list, tuple, set, frozenset)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                        and t >= 0 for t in ids):
            bad("stop_token_ids", "a list of token ids")
        self.stop_token_ids = list(ids)
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not number(self.temperature) or self.temperature < 0:
            bad("temperature", "a number >= 0")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "an integer >= 0")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.truncate not in (None, "left"):
            raise ValueError(f"SamplingParams.truncate must be None or 'left', got {self.truncate!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        given = [n for n in ("json_schema", "regex", "choice") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"SamplingParams: give one of json_schema, regex, choice, not {given}")
        if given and self.stop:
            raise ValueError(f"SamplingParams: stop strings would cut a {given[0]} completion mid-structure; "
                             "the grammar decides where it ends")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError(f"SamplingParams.choice must be a non-empty list of non-empty strings, got {self.choice!r}")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise ValueError(f"SamplingParams.regex must be a non-empty string, got {self.regex!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise ValueError(f"SamplingParams.json_schema must be a dict or JSON text, got {type(self.json_schema).__name__}")

    @property
    def constrained(self) -> bool:
        return self.json_schema is not None or self.regex is not None or self.choice is not None

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE (where fp32 logits / T overflow) act as 0."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) from (seed, step): the randomness of a row's step-th token."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def filter_logits(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Mask logits [B, V] (or [V]) outside each row's top-k and top-p nucleus with -inf.
    top_k, top_p: one value for all rows or one per row; 0 and 1.0 turn them off."""
    squeeze = logits.dim() == 1
    if squeeze:
        logits = logits[None]
    B, V = logits.shape
    ks = [top_k] * B if isinstance(top_k, int) else list(top_k)
    ps = [top_p] * B if isinstance(top_p, (int, float)) else list(top_p)
    if any(0 < k < V for k in ks):
        kmax = max(k for k in ks if 0 < k < V)
        kth = logits.topk(kmax, dim=-1).values  # [B, kmax], descending
        k_idx = torch.tensor([min(k, kmax) - 1 if 0 < k < V else 0 for k in ks], device=logits.device)
        threshold = kth.gather(1, k_idx[:, None])
        off = torch.tensor([not 0 < k < V for k in ks], device=logits.device)[:, None]
        logits = logits.masked_fill((logits < threshold) & ~off, float("-inf"))
    if any(p < 1.0 for p in ps):
        # as transformers' TopPLogitsWarper, so ties at the boundary fall the same way: ascending
        # order, drop the tokens whose cumulative mass (from the bottom) stays within 1 - top_p,
        # always keep the most likely one
        sorted_logits, order = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        p_t = torch.tensor(ps, dtype=cum.dtype, device=logits.device)[:, None]
        drop = (cum <= 1 - p_t) & (p_t < 1.0)
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits[0] if squeeze else logits


class Sampler:
    """logits [B, V] + each row's params, seed and step -> one token per row (+ its logprob)."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
                 want_logprobs: bool = False):
        logits = logits.float()
        tokens = logits.argmax(-1)  # greedy rows; sampled rows are overwritten below
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        for a in range(0, len(sampled), SAMPLE_ROWS):  # in chunks: sort / cumsum temporaries stay small
            rows = sampled[a:a + SAMPLE_ROWS]
            temps = torch.tensor([params[i].temperature for i in rows], device=logits.device)[:, None]
            sub = filter_logits(logits[rows] / temps, [params[i].top_k for i in rows], [params[i].top_p for i in rows])
            cdf = sub.softmax(-1).double().cumsum(-1)  # [R, V]
            u = torch.tensor([uniform(seeds[i], steps[i]) for i in rows], dtype=cdf.dtype, device=cdf.device)
            picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
            tokens[rows] = picked.clamp(max=logits.shape[-1] - 1)
        logprobs = None
        if want_logprobs:
            logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()
        return tokens.tolist(), logprobs
