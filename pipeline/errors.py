"""What stops a run before any model work (a config value, input file or model that cannot work:
exit 2), and a row's error as data (`RowError`: kind and message go to separate columns)."""

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
    """Why a row has no result: `kind` (snake_case, counted by the report), `message` in words."""

    kind: str
    message: str

    def at(self, where: str) -> "RowError":
        """The same error, its message saying where in the file it was found."""
        return RowError(self.kind, f"{self.message} ({where})")

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def one_line(text: str | None) -> str | None:
    """An error's first non-empty line (the rest of a Ray error is a traceback), no ANSI colours."""
    if text is None:
        return None
    lines = [line.strip() for line in ANSI_ESCAPE.sub("", text).splitlines() if line.strip()]
    return lines[0] if lines else ""
