"""Checks on the values callers pass that every way in (the lanes, the API, the app) makes the
same way: numbers that are numbers (not booleans, not text), text that is Unicode.

Depends on nothing; never imports a pipeline or the UI.
"""

from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate, or None if it is Unicode text. JSON's escape "\\ud800"
    reads as one: half of a UTF-16 pair, which UTF-8 cannot encode and no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None
