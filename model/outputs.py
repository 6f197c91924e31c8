"""What the engine returns, and the output step that makes it.

After the scheduler records a step's tokens, rows with stop strings are detokenized a short
window per new token (as vLLM does) and ended where their text reaches one; a finished row
becomes a `Completion`. Errors are data: every result has `error` (the message) and `error_kind`
(empty_prompt, invalid_prompt, prompt_too_long, invalid_choice, invalid_sampling,
kv_cache_too_small, grammar_error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .scheduler import Sequence


class RowError(ValueError):
    """Why the engine cannot run one row: its `kind` and the message."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def error_kind(e: Exception, default: str) -> str:
    return getattr(e, "kind", default)


@dataclass
class TokenLogprob:
    """A token's raw log-probability (before temperature, top-k / top-p and grammar masks; None for
    a prompt's first token), its text (`PersimmonTokenizer.token_text`; "" without a tokenizer) and,
    for a generated token, the `logprobs` most likely alternatives at its position."""
    token_id: int
    token: str
    logprob: float | None
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "error"  # "stop" | "length" | "error"
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None  # per generated token, with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob] | None = None  # per prompt token, with SamplingParams.prompt_logprobs
    error: str | None = None
    error_kind: str | None = None


@dataclass
class Classification:
    label: str | None = None
    score: float | None = None  # probability of `label` (the value itself for regression)
    probs: list[float] | None = None
    error: str | None = None
    error_kind: str | None = None


@dataclass
class ChoiceScores:
    label: str | None = None  # the most likely choice
    scores: list[float] | None = None  # log-likelihood of each choice (sum or mean), in `choices` order
    num_tokens: list[int] | None = None  # continuation tokens of each choice
    error: str | None = None
    error_kind: str | None = None


@dataclass
class TextScore:
    """A text's log-likelihood (`Engine.score`) over its `num_tokens` scored tokens;
    `mean_logprob` = logprob / num_tokens; `perplexity` = exp(-mean_logprob)."""
    logprob: float | None = None
    num_tokens: int | None = None
    mean_logprob: float | None = None
    perplexity: float | None = None
    error: str | None = None
    error_kind: str | None = None


class Detokenizer:
    """The text of a growing list of token ids, a short window per new token: the text of
    tokens[prefix:] minus that of tokens[prefix:read] is what they added; a window ending inside
    a UTF-8 character (U+FFFD at the end) waits for the next token."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.text, self.prefix, self.read = decode, "", 0, 0

    def add(self, tokens: list[int]) -> str:
        """`tokens` is the whole output so far; returns the text its newest tokens added."""
        before = self.decode(tokens[self.prefix:self.read])
        after = self.decode(tokens[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.text += delta
            self.prefix, self.read = self.read, len(tokens)
            return delta
        return ""


class OutputProcessor:
    """The output step (module docstring). Without `decode` (no tokenizer) texts are empty and
    stop strings are not looked for; `token_text` names single tokens in log-probabilities."""

    def __init__(self, decode: Callable[[list[int]], str] | None, token_text: Callable[[int], str] | None = None):
        self.decode = decode
        self.token_text = token_text or (lambda token_id: "")
        self.detok: dict[Sequence, Detokenizer] = {}  # rows with stop strings
        self.cut: dict[Sequence, str] = {}  # a row's text up to the stop string that ended it

    def add(self, seq: Sequence) -> None:
        if self.decode is not None and seq.params.stop:
            self.detok[seq] = Detokenizer(self.decode)

    def stop_strings(self, seqs: list[Sequence]) -> list[Sequence]:
        """The rows of `seqs` (each just given a token) whose text now holds a stop string."""
        hits = []
        for seq in seqs:
            detok = self.detok.get(seq)
            if detok is None or seq.finish_reason in ("stop", "error"):
                continue
            delta = detok.add(seq.output)
            if not delta:
                continue
            text, stops = detok.text, seq.params.stop
            start = max(0, len(text) - len(delta) - max(map(len, stops)) + 1)  # may straddle the old text
            found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if found:
                self.cut[seq] = text[:min(found)]
                hits.append(seq)
        return hits

    def completion(self, seq: Sequence) -> Completion:
        self.detok.pop(seq, None)
        cut = self.cut.pop(seq, None)
        done = dict(token_ids=list(seq.output), num_prompt_tokens=len(seq.prompt),
                    num_generated_tokens=len(seq.output), finish_reason=seq.finish_reason)
        if seq.finish_reason == "error":
            return Completion(**done, error=seq.error, error_kind=seq.error_kind)
        ids = seq.output
        if seq.finish_reason == "stop" and ids and ids[-1] in seq.stop_ids:
            ids = ids[:-1]
        text = cut if cut is not None else self.decode(ids) if self.decode is not None else ""
        return Completion(**done, text=text, **self.logprobs(seq))

    def logprobs(self, seq: Sequence) -> dict:
        """The Completion fields of the log-probabilities a row asked for."""
        out, name = {}, self.token_text
        if seq.params.logprobs is not None:
            out["logprobs"] = [TokenLogprob(t, name(t), lp, [TokenLogprob(i, name(i), v) for i, v in zip(ids, values)])
                               for t, (lp, ids, values) in zip(seq.output, seq.logprobs)]
        if seq.params.prompt_logprobs:
            values = [None, *seq.prompt_logprobs]
            out["prompt_logprobs"] = [TokenLogprob(t, name(t), v) for t, v in zip(seq.prompt, values)]
        return out

    def clear(self) -> None:
        self.detok.clear()
        self.cut.clear()
