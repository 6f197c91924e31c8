"""Sampling settings, declared once (no torch: the scheduler and the pipeline's settings read it).

`SamplingSettings` is each setting's one declaration: type, bounds and help text. The pipeline's
run config inherits it (flags, YAML keys and keyword arguments, checked strictly), and its fields
marked `row` are also input columns, each row's value checked by the same field leniently
(`check_row`: "0.7" is 0.7, 3.0 is 3). `SamplingParams` is what the engine runs a row with: the
settings, those only the engine's callers set, and the rules between fields. A new setting is a
field here and its use in the sampler.
"""

# no `from __future__ import annotations`: PipelineConfig inherits these fields in another module, and
# pydantic 2.5 / 2.10 / 2.11 resolve string annotations (BeforeValidator(_strings)) there, where they fail
import functools
import json
import math
from typing import Annotated, Literal, Optional, Union, get_args

from pydantic import BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

MIN_TEMPERATURE = 1e-5  # below this, fp32 logits / T overflow: such rows are greedy
MAX_LOGPROBS = 20  # top alternatives a token may report (OpenAI's top_logprobs limit)
CONSTRAINTS = ("json_schema", "regex", "choice")
STRICT = ConfigDict(strict=True, extra="forbid")
ROW = {"row": True}  # marks a field a row's column of the same name may set


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_list(value):
    return list(value) if isinstance(value, (tuple, set, frozenset)) else value  # given so in Python


def _strings(value):
    """Stop strings: one string is one stop string (the run's comma-separated text is split by its config)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"must be a string or a list of strings, got {value!r:.60}")
    return list(value)


def _schema(value):
    if value is not None and not isinstance(value, (str, dict)):
        raise ValueError(f"must be a dict (the schema) or a string, got {value!r:.60}")
    return value


AsList = BeforeValidator(_as_list)
Unset = BeforeValidator(lambda v: None if v in ("", "none", "None") else v)  # `--truncate none`
NoneIsEmpty = BeforeValidator(lambda v: [] if v is None else v)


_EXPECTED = {"bool_type": "true or false", "bool_parsing": "true or false", "int_type": "an integer",
             "int_parsing": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "float_parsing": "a number", "string_type": "a string", "list_type": "a list", "dict_type": "a mapping"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def refusal(e: ValidationError, name: str | None = None) -> str:
    """pydantic's first problem in one line naming the setting (`top_p: must be > 0, got 0`); `name`:
    the setting a lone value was checked for."""
    err = e.errors()[0]
    loc, value, kind, ctx = err["loc"], err["input"], err["type"], err.get("ctx") or {}
    if kind == "unexpected_positional_argument":
        return f"settings are given by name (max_new_tokens=64), got a positional {value!r:.40}"
    if kind in _EXPECTED:
        why = f"expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r:.80}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound  # ge=0 on a float: 0.0
        why = f"must be {_BOUNDS[kind]} {bound}, got {value!r}"
    elif kind == "literal_error":
        why = f"must be one of {ctx['expected']}, got {value!r}"
    elif kind == "finite_number":
        why = f"must be a finite number, got {value!r}"
    elif kind == "value_error":  # a validator's own words
        why = str(ctx.get("error", err["msg"]))
    else:
        why = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {value!r:.80}"
    name = name or (str(loc[0]) if loc else "")
    return f"{name}: {why}" if name else why


def one_line_errors(error):
    """A class decorator: construction (also `dataclasses.replace`) raises `error(cls, ValidationError)`,
    an exception of one line naming the setting, not pydantic's block of them."""
    def decorate(cls):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise error(cls, e) from None

        cls.__init__ = __init__
        return cls

    return decorate


def _engine_error(cls, e: ValidationError) -> Exception:
    odd = e.errors()[0]["type"] in ("unexpected_keyword_argument", "unexpected_positional_argument")
    return (TypeError if odd else ValueError)(refusal(e))  # as a plain dataclass says those


def setting(default, help: str, **kwargs):
    """A field's default, help text (--help, the YAML key's meaning), bounds and marks
    (`json_schema_extra`: ROW, a row's column of the same name may set it for that row)."""
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), description=help, kw_only=True, **kwargs)
    return Field(default, description=help, kw_only=True, **kwargs)


@dataclass(config=STRICT, kw_only=True)  # settings are named, never given by position
class SamplingSettings:
    max_new_tokens: int = setting(64, "generate: maximum tokens generated per row.", json_schema_extra=ROW, ge=1)
    temperature: float = setting(0.0, "generate: sampling temperature; 0 = greedy (deterministic).",
                                 json_schema_extra=ROW, ge=0, allow_inf_nan=False)
    top_k: int = setting(0, "generate: keep the k most likely tokens when sampling; 0 = off.", json_schema_extra=ROW,
                         ge=0)
    top_p: float = setting(1.0, "generate: nucleus sampling mass; 1.0 = off.", json_schema_extra=ROW, gt=0, le=1,
                           allow_inf_nan=False)
    stop: Annotated[list[str], BeforeValidator(_strings)] = setting([], "generate: stop strings (comma-separated); "
                "not included in the output.", json_schema_extra=ROW)
    json_schema: Annotated[Union[str, dict, None], BeforeValidator(_schema)] = setting(None, "generate: a JSON schema "
                "file (local or object store; or the schema as a dict in YAML / Python): every completion is JSON "
                "matching it (constrained decoding with llguidance). The `parsed` column holds the JSON of rows that "
                "finished (null when cut off by --max-new-tokens).", json_schema_extra=ROW)
    regex: Optional[str] = setting(None, "generate: every completion matches this regular expression (constrained "
                "decoding).", min_length=1)
    logprobs: Optional[int] = setting(None, "generate: add a `logprobs` column: each generated token's id, text and "
                "log-probability, with this many most likely alternatives (0-20): the model's own (log_softmax of its "
                "logits, before temperature, top-k / top-p and any grammar), as vLLM reports by default. Unset = none.",
                json_schema_extra=ROW, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: bool = setting(False, "generate: add a `prompt_logprobs` column: each prompt token's id, text and "
                "log-probability given the tokens before it (null for the first). Such rows compute their whole "
                "prompt (the prefix cache keeps no hidden states).", json_schema_extra=ROW)
    seed: Optional[int] = setting(None, "generate: base seed for sampling. Each row uses a seed derived from this and "
                "its id, so retried or resumed rows give the same text.", json_schema_extra=ROW, ge=0, lt=1 << 63)
    truncate: Annotated[Optional[Literal["left"]], Unset] = setting(None, "Over-long prompts: unset = row gets an "
                "error; 'left' = keep the last tokens that fit.")


@one_line_errors(_engine_error)
@dataclass(config=STRICT, kw_only=True)  # settings are named, never given by position
class SamplingParams(SamplingSettings):
    """A row's settings as the engine runs them: stop strings are trimmed from the text and empty
    ones dropped; one of json_schema, regex or choice constrains the completion (model/structured.py)."""

    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], AsList, NoneIsEmpty] = \
        Field(default_factory=list, kw_only=True)
    ignore_eos: bool = False  # keep going past the model's eos token
    choice: Annotated[Optional[list[Annotated[str, Field(min_length=1)]]], AsList] = \
        Field(None, min_length=1, kw_only=True)

    def __post_init__(self):
        self.stop = [s for s in self.stop if s]
        given = [name for name in CONSTRAINTS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of json_schema, regex, choice, not {given}")
        if given and self.stop:
            raise ValueError(f"stop strings would cut a {given[0]} completion mid-structure; the grammar decides "
                             "where it ends")

    @property
    def constrained(self) -> bool:
        return any(getattr(self, name) is not None for name in CONSTRAINTS)

    @property
    def greedy(self) -> bool:
        """Temperatures below MIN_TEMPERATURE (where fp32 logits / T overflow) act as 0."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


ROW_SETTINGS = {name: TypeAdapter(Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation)
                for name, f in SamplingSettings.__pydantic_fields__.items() if (f.json_schema_extra or {}).get("row")}


def _number(text: str):
    """Text as a number if it is one ("3", " 0.5", "1e3"), else as it was (the field then refuses it)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_row(name: str, value):
    """A row's own value of setting `name` in the type its field holds, checked by the field's rules
    leniently: text and integral floats are numbers (CSV cells, Parquet columns with nulls), a
    schema may be its JSON text, numpy values are Python's. None for a missing one (null, an empty
    cell, NaN, an empty stop list): the run's applies. A refused one is a ValueError naming it."""
    if callable(getattr(value, "tolist", None)):  # numpy / pandas values from a processor's preprocess
        value = value.tolist()
    if isinstance(value, str) and name != "stop":  # "\n" may be a stop string
        value = value.strip()
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return None
    kinds = get_args(SamplingSettings.__pydantic_fields__[name].annotation) or \
        (SamplingSettings.__pydantic_fields__[name].annotation,)
    try:
        if isinstance(value, str) and name == "json_schema":
            value = json.loads(value)
            if not isinstance(value, dict):
                raise ValueError(f"json_schema: must be a JSON object, got a {type(value).__name__}")
        elif isinstance(value, bool) != (bool in kinds):  # lax mode would make True a 1, and "yes" or 1 true
            value = {"true": True, "false": False}.get(value.lower(), value) if isinstance(value, str) else value
            return ROW_SETTINGS[name].validate_python(value, strict=True)  # nothing lax left to do
        elif isinstance(value, str) and (int in kinds or float in kinds):
            value = _number(value)
        if int in kinds and isinstance(value, float) and value.is_integer():
            value = int(value)  # past int64 too, so the bound names the value
        value = ROW_SETTINGS[name].validate_python(value, strict=False)
    except ValidationError as e:
        raise ValueError(refusal(e, name)) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"json_schema: not JSON ({e})") from None
    return (value or None) if name == "stop" else value
