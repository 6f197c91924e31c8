"""Sampling parameters and the sampler: temperature 0 is greedy; top-k / top-p per row.

Each sampled row owns a `torch.Generator` seeded from its `seed`, so a seeded row draws the same
tokens whatever other rows share its batch or whichever slot it occupies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if self.truncate not in (None, "left"):
            raise ValueError(f"SamplingParams.truncate must be None or 'left', got {self.truncate!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask [V] logits outside the top-k and the top-p nucleus with -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]):
    """Pick one token per row of `logits` [B, V]. Returns (tokens [B] long, logprobs [B] fp32 or None)."""
    logits = logits.float()
    tokens = logits.argmax(-1)  # greedy for every row; sampled rows are overwritten below
    for row, p in enumerate(params):
        if p.greedy:
            continue
        row_logits = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = row_logits.softmax(-1)
        tokens[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    logprobs = None
    if any(p.logprobs for p in params):
        logprobs = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs
