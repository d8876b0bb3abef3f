"""Errors a user can fix. The CLI prints them as one paragraph and exits with status 2."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad config, data or command line: the message names the problem and the fix."""

    exit_code = 2


def brief(value: Any, width: int = 40) -> str:
    """A value as a message shows it: a 30-digit number or a 2 MB string must not fill the terminal.

    Examples: brief(10**30) -> '1e+30'; brief(0.5) -> '0.5'; brief('x' * 100) -> "'xxxx...xxxx' (100 characters)"."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        return f"{value:.3g}"
    text = repr(value) if isinstance(value, str) else str(value)
    if len(text) <= width:
        return text
    half = (width - 5) // 2
    return f"{text[:half]}...{text[-half:]} ({len(value) if isinstance(value, str) else len(text)} characters)"
