"""Token log-probabilities, as vLLM reports them: for a sampled token, log_softmax of the raw
logits (before temperature, top-k / top-p and grammar masks) with the N most likely
alternatives; for a prompt token, the log-probability the model gave it after those before it.

log_softmax runs only on the rows asked for, LOGPROB_ROWS at a time: the temporaries are
[LOGPROB_ROWS, vocab] in fp32 whatever the batch, never [rows, seq, vocab].
"""

from __future__ import annotations

import torch

from .capacity import LOGPROB_ROWS  # rows of [rows, vocab] fp32 log-probabilities computed at once


def sampled_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int],
                     top_n: list[int]) -> list[tuple[float, list[int], list[float]]]:
    """For each row of raw `logits` [B, V] in `rows`: (the log-probability of its token in `tokens`,
    the ids and log-probabilities of its `top_n` most likely tokens)."""
    out = []
    for a in range(0, len(rows), LOGPROB_ROWS):
        chunk = rows[a:a + LOGPROB_ROWS]
        lp = logits[torch.tensor(chunk, device=logits.device)].float().log_softmax(-1)  # [n, V]
        picked = torch.tensor(tokens[a:a + LOGPROB_ROWS], device=lp.device)
        chosen = lp.gather(1, picked[:, None])[:, 0].tolist()
        k = max(top_n[a:a + LOGPROB_ROWS])
        values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], picked[:, None][:, :0])
        values, ids = values.tolist(), ids.tolist()
        for j, n in enumerate(top_n[a:a + LOGPROB_ROWS]):
            out.append((chosen[j], ids[j][:n], values[j][:n]))
    return out


def target_logprobs(lm_head, hidden: torch.Tensor, targets: list[int]) -> list[float]:
    """log p(targets[i] | hidden[i]) for hidden [M, C], LOGPROB_ROWS positions at a time."""
    out: list[float] = []
    for a in range(0, hidden.shape[0], LOGPROB_ROWS):
        lp = lm_head(hidden[a:a + LOGPROB_ROWS]).float().log_softmax(-1)  # [n, V]
        want = torch.tensor(targets[a:a + LOGPROB_ROWS], device=lp.device)
        out += lp.gather(1, want[:, None])[:, 0].tolist()
    return out
