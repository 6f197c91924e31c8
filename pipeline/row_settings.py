"""Per-row sampling settings (README "Per-row sampling settings"): a `generate` input's optional
columns SAMPLING_COLUMNS; a row's non-null value replaces the run's setting for that row (null or
an empty cell keeps it). `stop` is a string or a list of strings, `json_schema` an object or its
JSON text, `seed` is used as given (else derived from --seed and the row id).

Each value is checked for its own row: a bad one (a negative temperature, top_k 2.5, a numeric
stop) is that row's `invalid_sampling` error, and its neighbours run. Numbers may be text (CSV
cells): "0.7" is 0.7; integral floats are integers (Parquet columns with nulls and pandas exports
turn integers into floats).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any

from model.sampling_params import SamplingParams

from .errors import RowError

# the run's sampling settings: each SamplingParams field is a config field of the same name, but
# these, which the engine takes and the run's config does not (--choices makes `choice`)
ENGINE_ONLY = ("stop_token_ids", "ignore_eos", "choice")
RUN_SAMPLING = tuple(f.name for f in fields(SamplingParams) if f.name not in ENGINE_ONLY)
SAMPLING_COLUMNS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "json_schema", "logprobs",
                    "prompt_logprobs")
_INTEGERS = ("max_new_tokens", "top_k", "seed", "logprobs")
_NUMBERS = ("temperature", "top_p")


class SettingError(ValueError):
    pass


def sampling_params(**settings):
    """The engine's `SamplingParams` for the run's or a row's settings, the one place they are checked;
    a refused one is a SettingError naming it (`temperature must be ...`)."""
    try:
        return SamplingParams(**settings)
    except ValueError as e:
        raise SettingError(str(e).replace("SamplingParams.", "")) from None


def _number(name: str, value: Any) -> int | float:
    if isinstance(value, str):
        try:  # int() and float() ignore surrounding whitespace
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise SettingError(f"{name} {value!r:.40} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SettingError(f"{name} must be a number, got a {type(value).__name__} ({value!r:.40})")
    if not math.isfinite(value):
        raise SettingError(f"{name} must be finite, got {value!r}")
    if name in _INTEGERS:
        if value != int(value):
            raise SettingError(f"{name} must be an integer, got {value!r}")
        value = int(value)
        if name == "seed" and not 0 <= value < 1 << 63:
            raise SettingError(f"seed must be in [0, 2**63), got {value}")
    return value


def coerce(name: str, value: Any) -> Any:
    """A per-row setting's value in the type the engine takes, or None to keep the run's; SettingError
    for a value of the wrong kind."""
    if value is None:
        return None
    empty = isinstance(value, str) and not value.strip() or isinstance(value, float) and math.isnan(value)
    if empty and name != "stop":
        return None  # an empty cell, or pandas' missing value
    if name in _INTEGERS or name in _NUMBERS:
        return _number(name, value)
    if name == "stop":
        if isinstance(value, str):
            return [value] if value else None
        if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
            return list(value) or None  # an empty list is "none given" (Parquet's natural empty value)
        raise SettingError(f"stop must be a string or a list of strings, got {value!r:.60}")
    if name == "prompt_logprobs":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"  # a CSV cell
        if not isinstance(value, bool):
            raise SettingError(f"prompt_logprobs must be true or false, got {value!r:.40}")
        return value
    if name == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise SettingError(f"json_schema is not JSON ({e})") from None
        if not isinstance(value, dict):
            raise SettingError(f"json_schema must be a JSON object, got a {type(value).__name__}")
        return value
    raise KeyError(name)


def checked(name: str, value: Any, say=str) -> tuple[Any, RowError | None]:
    """(coerce(name, value), None), or (None, the row's error); `say` words the message (an OpenAI
    batch's names the request's fields)."""
    try:
        return coerce(name, value), None
    except SettingError as e:
        return None, RowError("invalid_sampling", say(str(e)))


def row_overrides(columns: dict[str, list], n: int) -> list[tuple[dict, RowError | None]]:
    """Per row, (its overrides {setting: value}, error or None) from the per-row setting columns."""
    out: list[tuple[dict, RowError | None]] = []
    for i in range(n):
        settings, error = {}, None
        for name, values in columns.items():
            value, error = checked(name, values[i])
            if error is not None:
                break
            if value is not None:
                settings[name] = value
        out.append((settings, error))
    return out
