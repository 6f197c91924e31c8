"""Per-row sampling settings: optional input columns that override the run's defaults row by row.

A `generate` input may carry any of these columns; a row's non-null value replaces the run's
setting for that row only (null or an empty cell keeps the run's value):

    max_new_tokens  integer >= 1
    temperature     number >= 0 (0 = greedy)
    top_p           number in (0, 1]
    top_k           integer >= 0 (0 = off)
    stop            a string, or a list of strings (replaces the run's stop strings)
    seed            integer: the row's own seed, used as given (without it a sampled row's seed
                    derives from --seed and the row id)
    json_schema     a JSON schema (object, or its JSON text): the row's completion must match it
    logprobs        integer in [0, 20]: the row's generated tokens get log-probabilities and this
                    many top alternatives each (the `logprobs` output column)
    prompt_logprobs true / false: the row's prompt tokens get log-probabilities

Values are checked per row: a bad one (a negative temperature, top_k 2.5, a stop that is a
number) is that row's error (`error_kind` invalid_sampling), and its neighbours run. Numbers may be
given as text (CSV cells are text): "0.7" is 0.7. Integral floats are integers (16.0 is 16:
Parquet columns holding nulls and pandas exports turn integers into floats).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import RowError

SAMPLING_COLUMNS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "json_schema", "logprobs",
                    "prompt_logprobs")
_INTEGERS = ("max_new_tokens", "top_k", "seed", "logprobs")
_NUMBERS = ("temperature", "top_p")


class SettingError(ValueError):
    pass


def sampling_params(**settings):
    """The engine's `SamplingParams` for these settings (the run's, or a row's own): the one place
    where they are checked; a refused one is a SettingError naming it (`temperature must be ...`)."""
    from model import SamplingParams

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
    """The value of one per-row setting in the type the engine takes, or None to keep the run's
    value. Raises SettingError for a value of the wrong kind."""
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
    """(coerce(name, value), None), or (None, the row's error) for a refused value; `say` words
    the message (an OpenAI batch's names the request's fields)."""
    try:
        return coerce(name, value), None
    except SettingError as e:
        return None, RowError("invalid_sampling", say(str(e)))


def row_overrides(columns: dict[str, list], n: int) -> list[tuple[dict, RowError | None]]:
    """For each of `n` rows, (its overrides {setting: value}, error or None), from the batch's
    per-row setting columns ({name: values})."""
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
