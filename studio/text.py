"""Checks on text that every way in (the lanes, the API, the app) makes the same way.

Depends on nothing; never imports a pipeline or the UI.
"""

from __future__ import annotations


def lone_surrogate(text: str) -> int | None:
    """Where `text` holds a lone surrogate, or None if it is Unicode text. JSON's escape "\\ud800"
    reads as one: half of a UTF-16 pair, which UTF-8 cannot encode and no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return error.start
    return None
