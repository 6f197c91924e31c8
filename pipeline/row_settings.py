"""Per-row sampling settings (README "Per-row sampling settings"): a `generate` input's optional
columns SAMPLING_COLUMNS (model/sampling_params.py's fields marked ROW); a row's non-null value
replaces the run's setting for that row (null or an empty cell keeps it). `stop` is a string or a
list of strings, `json_schema` an object or its JSON text, `seed` is used as given (else derived
from --seed and the row id).

Each value is checked for its own row, by its field's rules: a bad one (a negative temperature,
top_k 2.5, a numeric stop) is that row's `invalid_sampling` error, and its neighbours run. Numbers
may be text (CSV cells): "0.7" is 0.7; integral floats are integers (Parquet columns with nulls
and pandas exports turn integers into floats).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from model.sampling_params import ROW_SETTINGS, SamplingParams, SamplingSettings, check_row

from .errors import RowError

RUN_SAMPLING = tuple(f.name for f in fields(SamplingSettings))  # each is a run setting of the same name
SAMPLING_COLUMNS = tuple(ROW_SETTINGS)


class SettingError(ValueError):
    pass


def sampling_params(**settings):
    """The engine's `SamplingParams` for the run's or a row's settings; a refused one is a SettingError
    naming it (`temperature: must be >= 0, got -1`)."""
    try:
        return SamplingParams(**settings)
    except ValueError as e:
        raise SettingError(str(e)) from None


def checked(name: str, value: Any, say=str) -> tuple[Any, RowError | None]:
    """(a row's value of setting `name` as the engine takes it, None to keep the run's; None), or (None,
    the row's error); `say` words the message (an OpenAI batch's names the request's fields)."""
    try:
        return check_row(name, value), None
    except ValueError as e:
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
