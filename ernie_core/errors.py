"""User-facing errors. Entry points print these in one line and exit with code 2; no traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, paths). The message says what to change."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, value or combination is wrong; the message names the key."""


class DataError(UserError):
    """A data file is missing or malformed; the message names the file, the line and the reason."""

    def __init__(self, path, line: int | None, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}")
