"""The engine's forwards that sample nothing: zero-shot labeling by choice scores, and
classification. Each function here is an `Engine` method (model/engine.py binds it), so `self`
is the engine.

- `score_choices`: each (prompt, choice) pair is one scoring row through the scheduler, computed
  up to the choice's last token but one, the LM head applied only where a choice token is
  predicted; the rows of a prompt share its full KV blocks through the prefix cache.
- `classify`: whole rows packed side by side with no cache, the head on each row's last token.
"""

from __future__ import annotations

import torch

from .modeling import PersimmonForSequenceClassification
from .outputs import ChoiceScores, Classification, RowError, error_kind
from .scheduler import Sequence

LOGITS_ROWS = 64  # rows of scoring logits [rows, vocab] computed at once


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
    so long labels are not penalised for their length). Identical rows are computed once."""
    self._require_causal("score_choices")
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    if not choices:
        raise ValueError("score_choices needs at least one choice")
    if any(isinstance(c, str) for c in choices) and self.tokenizer is None:
        raise ValueError("this engine has no tokenizer: pass choices as token-id lists")
    results: list[ChoiceScores | None] = [None] * len(prompts)
    scores: dict[int, list[float]] = {}
    lengths: dict[int, list[int]] = {}
    rows: dict[tuple, Sequence] = {}
    for i, prompt in enumerate(prompts):
        try:
            context, continuations = _continuations(self, prompt, choices, separator, add_bos)
        except ValueError as e:
            results[i] = ChoiceScores(error=str(e), error_kind=error_kind(e, "invalid_prompt"))
            continue
        scores[i], lengths[i] = [0.0] * len(choices), [len(c) for c in continuations]
        for k, cont in enumerate(continuations):
            key = (tuple(context + cont[:-1]), len(context))  # the same tokens scored from elsewhere: another row
            if key not in rows:
                rows[key] = Sequence(len(rows), list(key[0]), score_from=len(context) - 1,
                                     cacheable_tokens=self._cacheable(context))
            rows[key].targets.append((i, k, cont))
    for seq in rows.values():
        if not self.scheduler.add(seq):
            for i, _, _ in seq.targets:
                results[i] = ChoiceScores(error=seq.error, error_kind=seq.error_kind)
                scores.pop(i, None)

    def on_hidden(chunks):  # [(row, hidden [n, C] of its positions from max(score_from, computed))]
        picks, at = [], 0  # (hidden row, token it should predict, prompt, choice)
        for seq, h in chunks:
            start = max(seq.score_from, seq.num_computed)  # num_computed: before this step
            for i, k, cont in seq.targets:
                for j in range(h.shape[0]):
                    t = start + j - seq.score_from  # this position predicts continuation token t
                    if t < len(cont) and i in scores:
                        picks.append((at + j, cont[t], i, k))
            at += h.shape[0]
        hidden = torch.cat([h for _, h in chunks])
        for a in range(0, hidden.shape[0], LOGITS_ROWS):
            chunk = [p for p in picks if a <= p[0] < a + LOGITS_ROWS]
            if chunk:
                lp = self.runner.lm_head(hidden[a:a + LOGITS_ROWS]).float().log_softmax(-1)  # [n, V]
                at_rows = torch.tensor([p[0] - a for p in chunk], device=lp.device)
                tokens = torch.tensor([p[1] for p in chunk], device=lp.device)
                for (_, _, i, k), value in zip(chunk, lp[at_rows, tokens].tolist()):
                    scores[i][k] += value

    for _ in self._run(on_hidden):
        pass
    labels = [c if isinstance(c, str) else str(c) for c in choices]
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
        else:  # as lm-evaluation-harness: what the whole text has beyond the prompt's token count
            cont = self.tokenizer.encode(stripped + tail + separator + c, add_bos=add_bos)[len(context):]
        if not cont:
            raise RowError("invalid_choice", f"choice {c!r} adds no tokens after the prompt")
        continuations.append(cont)
    longest = max(len(c) for c in continuations)
    if len(context) + longest > self.max_seq_len:
        raise RowError("prompt_too_long", f"prompt has {len(context)} tokens; with the longest choice ({longest}) it "
                       f"exceeds max_seq_len={self.max_seq_len}")
    return context, continuations


@torch.inference_mode()
def classify(self, texts, add_bos: bool = True) -> list[Classification]:
    """Label each text with a sequence-classification checkpoint: the head reads the hidden
    state of each row's last token. Rows are packed side by side, up to
    `prefill_token_budget` tokens per forward, with no padding: one large matmul per layer,
    attention within each row."""
    if not isinstance(self.model, PersimmonForSequenceClassification):
        raise TypeError("classify needs a PersimmonForSequenceClassification checkpoint")
    limit = self.config.max_position_embeddings
    results: list[Classification | None] = [None] * len(texts)
    encoded = []
    for i, text in enumerate(texts):
        try:
            ids = self._encode(text, add_bos=add_bos)
            if len(ids) > limit:
                raise RowError("prompt_too_long",
                               f"text has {len(ids)} tokens, more than max_position_embeddings={limit}")
            encoded.append((i, ids))
        except ValueError as e:
            results[i] = Classification(error=str(e), error_kind=error_kind(e, "invalid_prompt"))
    for pack in token_budget_packs(encoded, lambda item: len(item[1]), self.prefill_token_budget):
        logits = self.runner.classify([row for _, row in pack]).float()
        for (i, _), row in zip(pack, logits):
            results[i] = _label(self.config, row)
    return results


def _label(cfg, logits: torch.Tensor) -> Classification:
    if cfg.num_labels == 1 or cfg.problem_type == "regression":
        return Classification(label=cfg.id2label.get(0, "LABEL_0"), score=logits[0].item(), probs=logits.tolist())
    probs = logits.sigmoid() if cfg.problem_type == "multi_label_classification" else logits.softmax(-1)
    best = int(probs.argmax())
    return Classification(label=cfg.id2label.get(best, f"LABEL_{best}"), score=probs[best].item(), probs=probs.tolist())


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
