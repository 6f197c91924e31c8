"""The engine's forwards that sample nothing, as `Engine` methods (`self` is the engine).

`score_choices` makes each (prompt, choice) pair, `score` each text (or window of a long text)
one scoring row through the scheduler; rows sharing a prefix share its KV blocks. Both go
through `_run_scoring`: the head runs on a chunk of positions at a time (never [rows, positions,
vocab] logits), keeping only each target's log-probability. `classify` packs whole rows side by
side with no cache and runs the head on each row's last token.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from .modeling import PersimmonForSequenceClassification
from .outputs import ChoiceScores, Classification, RowError, TextScore, error_kind
from .scheduler import Sequence

LOGITS_ROWS = 64  # rows of scoring logits [rows, vocab] computed at once (at least)


def _add_target(self, rows: dict, tokens: list[int], score_from: int, target: tuple) -> None:
    """Queue (owner, k, tokens) on the row feeding `tokens`; `score_from` predicts the target's first token."""
    key = (tuple(tokens), score_from)
    if key not in rows:
        rows[key] = Sequence(len(rows), list(tokens), score_from=score_from,
                             cacheable_tokens=self._cacheable(tokens))
    rows[key].targets.append(target)


def _run_scoring(self, rows: dict) -> tuple[dict, dict]:
    """Run the scoring rows to their end: ({(owner, k): summed target log-probabilities},
    {owner: its row that could not be queued, with the error}); failed owners are not summed."""
    sums: dict = defaultdict(float)
    failed: dict = {}
    for seq in rows.values():
        if not self.scheduler.add(seq):
            for owner, _, _ in seq.targets:
                failed.setdefault(owner, seq)
    chunk = max(LOGITS_ROWS, min(self.max_batch_size, 256))  # within capacity.activation_bytes' head rows

    def on_hidden(chunks):  # [(row, hidden [n, C] of its positions from max(score_from, computed))]
        at_rows, tokens, owners, keys, at = [], [], [], {}, 0
        for seq, h in chunks:
            offset = max(seq.score_from, seq.num_computed) - seq.score_from  # num_computed: before this step
            for owner, k, cont in seq.targets:
                if owner in failed:
                    continue
                n = min(h.shape[0], len(cont) - offset)  # position offset + j predicts cont[offset + j]
                if n > 0:
                    at_rows.extend(range(at, at + n))
                    tokens.extend(cont[offset:offset + n])
                    owners.extend([keys.setdefault((owner, k), len(keys))] * n)
            at += h.shape[0]
        if not at_rows:
            return
        hidden = torch.cat([h for _, h in chunks])
        dev = hidden.device
        unique, inverse = torch.unique(torch.tensor(at_rows, device=dev), return_inverse=True)
        tokens_t, values = torch.tensor(tokens, device=dev), torch.empty(len(tokens), device=dev)
        for a in range(0, unique.shape[0], chunk):
            logits = self.model.lm_head(hidden[unique[a:a + chunk]]).float()  # [n, V]
            lse = logits.logsumexp(-1)
            sel = ((inverse >= a) & (inverse < a + chunk)).nonzero().squeeze(1)
            r = inverse[sel] - a
            values[sel] = logits[r, tokens_t[sel]] - lse[r]
        totals = torch.zeros(len(keys), dtype=torch.float64, device=dev)
        totals.index_add_(0, torch.tensor(owners, device=dev), values.double())
        for key, value in zip(keys, totals.tolist()):
            sums[key] += value

    for _ in self._run(on_hidden):
        pass
    return sums, failed


@torch.inference_mode()
def score_choices(self, prompts, choices: list, *, normalize: str = "sum", separator: str = " ",
                  add_bos: bool = True) -> list[ChoiceScores]:
    """Log-likelihood of each choice as the continuation of each prompt.

    Continuation tokens as lm-evaluation-harness finds them: the tokens of `prompt + separator +
    choice` after the prompt's own (sentencepiece merges across the boundary; a choice encoded
    alone would get a dummy-prefix space); the prompt's trailing whitespace moves into the
    continuation. Token-id prompts and choices are used as they are. normalize: "sum", or "mean"
    (per choice token, so long labels are not penalised)."""
    self._require_causal("score_choices")
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")
    if not choices:
        raise ValueError("score_choices needs at least one choice")
    if any(isinstance(c, str) for c in choices) and self.tokenizer is None:
        raise ValueError("this engine has no tokenizer: pass choices as token-id lists")
    results: list[ChoiceScores | None] = [None] * len(prompts)
    lengths: dict[int, list[int]] = {}
    rows: dict[tuple, Sequence] = {}
    for i, prompt in enumerate(prompts):
        try:
            context, continuations = _continuations(self, prompt, choices, separator, add_bos)
            longest = max(len(c) for c in continuations)
            if len(context) + longest > self.max_seq_len:
                raise RowError("prompt_too_long", f"prompt has {len(context)} tokens; with the longest choice "
                               f"({longest}) it exceeds max_seq_len={self.max_seq_len}")
        except ValueError as e:
            results[i] = ChoiceScores(error=str(e), error_kind=error_kind(e, "invalid_prompt"))
            continue
        lengths[i] = [len(c) for c in continuations]
        for k, cont in enumerate(continuations):  # the same tokens scored from elsewhere: another row
            _add_target(self, rows, context + cont[:-1], len(context) - 1, (i, k, cont))
    sums, failed = _run_scoring(self, rows)
    labels = [c if isinstance(c, str) else str(c) for c in choices]
    for i, n in lengths.items():
        if i in failed:
            results[i] = ChoiceScores(error=failed[i].error, error_kind=failed[i].error_kind)
            continue
        s = [sums[(i, k)] for k in range(len(choices))]
        if normalize == "mean":
            s = [x / m for x, m in zip(s, n)]
        best = max(range(len(s)), key=s.__getitem__)
        results[i] = ChoiceScores(label=labels[best], scores=s, num_tokens=n)
    return results


def _continuations(self, prompt, choices, separator: str, add_bos: bool):
    """(context tokens, [continuation tokens per choice]) for one prompt (see score_choices)."""
    if isinstance(prompt, str) and not prompt.strip():
        raise RowError("empty_prompt", "empty prompt")
    # a text prompt's trailing whitespace belongs to the continuation
    context = self._encode(prompt.rstrip() if isinstance(prompt, str) else prompt, add_bos=add_bos)
    continuations = []
    for c in choices:
        if not isinstance(c, str):
            cont = list(c)
            bad = [t for t in cont if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
            if bad:
                raise RowError("invalid_choice", f"choice {c!r}: token ids outside the vocabulary: {bad[:5]}")
        elif not isinstance(prompt, str):
            raise RowError("invalid_prompt", "text choices need text prompts (the continuation is found in the text)")
        else:  # as lm-evaluation-harness: what the whole text has beyond the prompt's token count
            cont = self.tokenizer.encode(prompt + separator + c, add_bos=add_bos)[len(context):]
        if not cont:
            raise RowError("invalid_choice", f"choice {c!r} adds no tokens after the prompt")
        continuations.append(cont)
    return context, continuations


@torch.inference_mode()
def score(self, texts, *, score_after=None, add_bos: bool = True, rolling: bool = True,
          stride: int | None = None) -> list[TextScore]:
    """Log-likelihood of each text under the causal LM (perplexity filtering).

    Every token after BOS (`add_bos`; without it the first token is not scored) is scored given
    those before it: `logprob` = sum_j log p(t_j | BOS, t_1 .. t_j-1) over `num_tokens` tokens,
    `mean_logprob` = logprob / num_tokens, `perplexity` = exp(-mean_logprob), as transformers'
    `loss` (= -mean_logprob) on the same ids.

    score_after: a prefix (one for all texts or one per text; None or blank = none) read as
    context: only the tokens the text adds are scored, found as lm-evaluation-harness finds a
    continuation (the prefix's trailing whitespace moves to the text; no separator).

    Texts longer than W = max_seq_len are scored in rolling windows when `rolling`, as the
    harness's loglikelihood_rolling: the first window scores its W tokens; each next one holds
    the W tokens up to the end of the next `stride` (default W // 2; the harness's: W) tokens and
    scores those only, so every token is scored once with >= W - stride tokens of context.
    Without `rolling` such a text is a `prompt_too_long` row error."""
    self._require_causal("score")
    window = self.max_seq_len
    stride = window // 2 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise ValueError(f"stride must be an integer in [1, max_seq_len={window}], got {stride!r}")
    if score_after is None or isinstance(score_after, str):
        score_after = [score_after] * len(texts)
    score_after = list(score_after)
    if len(score_after) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(score_after)} score_after prefixes")
    results: list[TextScore | None] = [None] * len(texts)
    counts: dict[int, int] = {}
    rows: dict[tuple, Sequence] = {}
    for i, (text, prefix) in enumerate(zip(texts, score_after)):
        try:
            tokens, first = _scored_tokens(self, text, prefix, add_bos)
            n = len(tokens) - first  # tokens scored
            if not rolling and len(tokens) - 1 > window:
                raise RowError("prompt_too_long", f"text has {len(tokens)} tokens (BOS and prefix included): more "
                               f"than max_seq_len={window} + 1; score it with rolling windows")
        except ValueError as e:
            results[i] = TextScore(error=str(e), error_kind=error_kind(e, "invalid_prompt"))
            continue
        counts[i] = n
        for a, e, done in rolling_windows(len(tokens), first, window, stride):
            # feeds tokens[a:e]; position done - a predicts tokens[done + 1], ..., e - 1 predicts tokens[e]
            _add_target(self, rows, tokens[a:e], done - a, (i, 0, tokens[done + 1:e + 1]))
    sums, failed = _run_scoring(self, rows)
    for i, seq in failed.items():
        results[i] = TextScore(error=seq.error, error_kind=seq.error_kind)
    for i, n in counts.items():
        if i not in failed:
            logprob = sums[(i, 0)]
            mean = logprob / n
            perplexity = math.exp(-mean) if -mean < 709 else math.inf  # exp overflows a float past ~709
            results[i] = TextScore(logprob=logprob, num_tokens=n, mean_logprob=mean, perplexity=perplexity)
    return results


def _scored_tokens(self, text, prefix, add_bos: bool) -> tuple[list[int], int]:
    """(the tokens the model reads, the index of the first scored one) for one row of `score`."""
    if prefix is None or (isinstance(prefix, str) and not prefix.strip()) or (isinstance(prefix, list) and not prefix):
        tokens = self._encode(text, add_bos=add_bos)
        if len(tokens) < 2:
            raise RowError("empty_prompt", "nothing to score: the text is one token and there is no BOS before it")
        return tokens, 1
    if isinstance(text, str) and not text.strip():
        raise RowError("empty_prompt", "empty text")
    if isinstance(prefix, str):  # as _continuations: what prefix + text adds after the prefix's tokens
        if not isinstance(text, str):
            raise RowError("invalid_prompt", "a text score_after needs a text (the continuation is found in the text)")
        context = self._encode(prefix.rstrip(), add_bos=add_bos)
        cont = self.tokenizer.encode(prefix + text, add_bos=add_bos)[len(context):]
    else:
        context, cont = self._encode(prefix, add_bos=add_bos), self._encode(text, add_bos=False)
    if not cont:
        raise RowError("empty_prompt", "the text adds no tokens after score_after")
    return context + cont, len(context)


def rolling_windows(num_tokens: int, first: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (a, e, done) scoring tokens[first:]: feed tokens[a:e] (<= `window`), score done+1 .. e."""
    last, done, out = num_tokens - 1, first - 1, []
    while done < last:
        end = min(last, window) if done < window else min(last, done + stride)
        out.append((max(0, end - window), end, done))
        done = end
    return out


@torch.inference_mode()
def classify(self, texts, add_bos: bool = True) -> list[Classification]:
    """Label each text with a sequence-classification checkpoint; rows are packed side by side
    without padding, up to `prefill_token_budget` tokens per forward."""
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
    packs, tokens = [[]], 0  # consecutive packs of at most the budget (a longer row alone)
    for item in encoded:
        if packs[-1] and tokens + len(item[1]) > self.prefill_token_budget:
            packs.append([])
            tokens = 0
        packs[-1].append(item)
        tokens += len(item[1])
    for pack in filter(None, packs):
        logits = self.model.score(self.runner.forward_packed([row for _, row in pack])).float()
        for (i, _), row in zip(pack, logits):
            results[i] = _label(self.config, row)
    return results


def _label(cfg, logits: torch.Tensor) -> Classification:
    if cfg.num_labels == 1 or cfg.problem_type == "regression":
        return Classification(label=cfg.id2label.get(0, "LABEL_0"), score=logits[0].item(), probs=logits.tolist())
    probs = logits.sigmoid() if cfg.problem_type == "multi_label_classification" else logits.softmax(-1)
    best = int(probs.argmax())
    return Classification(label=cfg.id2label.get(best, f"LABEL_{best}"), score=probs[best].item(), probs=probs.tolist())

