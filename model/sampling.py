"""The batched sampler: temperature 0 is greedy; top-k / top-p per row (model/sampling_params.py).

One call handles every row of a step. Randomness is counter-based: a row's n-th token uses one
uniform number derived from (its seed, n) and inverse-CDF sampling over its filtered
distribution, so a seeded row draws the same tokens whatever its batch-mates, its table row, or
a preemption on the way; no generator state travels with it.
"""

from __future__ import annotations

import hashlib

import torch

from .capacity import SAMPLE_ROWS  # sampled rows filtered at once: bounds the sampler's [rows, vocab] temporaries
from .sampling_params import SamplingParams


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) from (seed, step): the randomness of a row's step-th token."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def filter_logits(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Mask logits [B, V] (or [V]) outside each row's top-k and top-p nucleus with -inf; top_k,
    top_p: one value or one per row (0 and 1.0: off)."""
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
    """logits [B, V] + each row's params, seed and step -> one token per row."""

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                 steps: list[int]) -> list[int]:
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
        return tokens.tolist()
