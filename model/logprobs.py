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


def step_logprobs(raw: torch.Tensor, sampling: list, tokens: list[int]) -> list | None:
    """Per sampling row of a step, its token's (logprob, top ids, top logprobs) or None; None if no row asks."""
    rows = [i for i, s in enumerate(sampling) if s.params.logprobs is not None]
    if not rows:
        return None
    found = sampled_logprobs(raw, rows, [tokens[i] for i in rows], [sampling[i].params.logprobs for i in rows])
    by_row = dict(zip(rows, found))
    return [by_row.get(i) for i in range(len(sampling))]


def prompt_logprobs(lm_head, hidden: torch.Tensor, prompt_rows: list) -> None:
    """Record the prompt log-probabilities of each (row, at, start, stop) of a step: position p in
    [start, stop) has its hidden state at `at + p - start` and predicts prompt token p + 1."""
    index, targets, spans = [], [], []
    for seq, at, start, stop in prompt_rows:
        n = max(0, stop - start)
        index += range(at, at + n)
        targets += seq.prompt[start + 1:start + 1 + n]
        spans.append((seq, n))
    if not index:
        return
    hidden = hidden[torch.tensor(index, device=hidden.device)]
    values: list[float] = []
    for a in range(0, len(index), LOGPROB_ROWS):
        lp = lm_head(hidden[a:a + LOGPROB_ROWS]).float().log_softmax(-1)  # [n, V]
        want = torch.tensor(targets[a:a + LOGPROB_ROWS], device=lp.device)
        values += lp.gather(1, want[:, None])[:, 0].tolist()
    k = 0
    for seq, n in spans:
        seq.prompt_logprobs += values[k:k + n]
        k += n
