"""The pipeline's errors: what stops a run before any model work (a config value, an input
file or a model that cannot work: exit 2), and a row's error as data (`RowError`), whose kind
and message travel apart to the output's `error_kind` and `error` columns, so nothing reads a
kind back out of a message."""

from __future__ import annotations

import re
from typing import NamedTuple


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


class InputError(ValueError):
    """Input files that cannot be processed; the message names them."""


class ModelError(ValueError):
    """A model directory that cannot be loaded; raised on the driver before any actor starts."""


class RowError(NamedTuple):
    """Why a row has no result: `kind`, a snake_case name the run report counts
    (`invalid_prompt`, `duplicate_id`, ...), and `message`, what went wrong in words."""

    kind: str
    message: str

    def at(self, where: str) -> "RowError":
        """The same error, its message saying where in the file it was found."""
        return RowError(self.kind, f"{self.message} ({where})")

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def one_line(text: str | None) -> str | None:
    """An error as the report and the console show it: its first non-empty line (the rest of a
    Ray error is a traceback), without the ANSI colour escapes Ray puts in its messages."""
    if text is None:
        return None
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", text).splitlines() if line.strip()]
    return lines[0] if lines else ""
