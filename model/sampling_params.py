"""A row's sampling settings, checked here and nowhere else (no torch: the scheduler and the
pipeline's settings read it). Every field's rule is one entry of `RULES`;
`SamplingParams.check(name, value)` applies one (the pipeline's per-row columns use it), building
a SamplingParams all of them plus the rules between fields. A new field is its rule, its use in
the sampler and a run setting of the same name (pipeline/settings.py: help, flag, YAML key) unless
pipeline/row_settings.ENGINE_ONLY lists it; the pipeline passes it on by name (RUN_SAMPLING).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

MIN_TEMPERATURE = 1e-5  # below this, fp32 logits / T overflow: such rows are greedy
MAX_LOGPROBS = 20  # top alternatives a token may report (OpenAI's top_logprobs limit)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


RULES = {  # field: (is it valid, what it must be)
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "stop": (lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v), "a string or a list of strings"),
    "stop_token_ids": (lambda v: isinstance(v, list) and all(is_int(t) and t >= 0 for t in v), "a list of token ids"),
    "ignore_eos": (lambda v: isinstance(v, bool), "True or False"),
    "seed": (lambda v: v is None or is_int(v), "an integer or None"),
    "logprobs": (lambda v: v is None or (is_int(v) and 0 <= v <= MAX_LOGPROBS),
                 f"None or an integer in [0, {MAX_LOGPROBS}] (top alternatives per token)"),
    "prompt_logprobs": (lambda v: isinstance(v, bool), "True or False"),
    "truncate": (lambda v: v in (None, "left"), "None or 'left'"),
    "json_schema": (lambda v: v is None or isinstance(v, (dict, str)), "a dict or JSON text"),
    "regex": (lambda v: v is None or (isinstance(v, str) and v != ""), "a non-empty string"),
    "choice": (lambda v: v is None or (isinstance(v, list) and v and all(isinstance(c, str) and c for c in v)),
               "a non-empty list of non-empty strings"),
}
CONSTRAINTS = ("json_schema", "regex", "choice")


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
    # each generated token's log-probability and this many top alternatives (None = off), from
    # the model's own distribution: before temperature, top-k / top-p and grammar masks
    logprobs: int | None = None
    prompt_logprobs: bool = False  # each prompt token's log-probability given the tokens before it
    truncate: str | None = None  # None: over-long prompts are an error; "left": keep the tail
    # structured output (one at a time): the completion must match (model/structured.py)
    json_schema: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, self.check(f.name, getattr(self, f.name)))
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"SamplingParams: give one of json_schema, regex, choice, not {given}")
        if given and self.stop:
            raise ValueError(f"SamplingParams: stop strings would cut a {given[0]} completion mid-structure; "
                             "the grammar decides where it ends")

    @staticmethod
    def check(name: str, value):
        """`value` as field `name` holds it (stop: a list, empties dropped), or ValueError saying why."""
        if name == "stop" and isinstance(value, str):
            value = [value]
        if name in ("stop", "stop_token_ids", "choice") and isinstance(value, (tuple, set, frozenset)):
            value = list(value)
        if name == "stop_token_ids" and value is None:
            value = []
        valid, want = RULES[name]
        if not valid(value):
            raise ValueError(f"SamplingParams.{name} must be {want}, got {value!r}")
        return [s for s in value if s] if name == "stop" else value

    @property
    def constrained(self) -> bool:
        return any(getattr(self, name) is not None for name in CONSTRAINTS)

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE (where fp32 logits / T overflow) act as 0."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1
