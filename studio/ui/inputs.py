"""The lanes' inputs as a browser or an API client sends them, checked into the pipelines' arguments.

The lanes' events take their inputs unprocessed (preprocess=False), because Gradio's own checks
end in `{"error": null}` for a NaN seed, a null slider or a string in a number field. Each check
here names the field, what it takes and what it got, in the words the app shows the user.

Depends on the standard library and studio.values; raises ValueError, which the lanes turn into messages.
"""

from __future__ import annotations

import json
import math

from studio.values import is_real, lone_surrogate

SHOWN = 60  # characters of a bad value repeated in a message


def _shown(value) -> str:
    """A value as the client sent it: JSON (null, NaN, "8"), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def _bound(x: float) -> str:
    if x == 2**63 - 1:
        return "2**63 - 1"
    return f"{int(x):,}" if x == int(x) else f"{x:g}"


def number(value, field: str, low: float, high: float, *, whole: bool = False, empty=None):
    """A JSON number in [low, high] (a whole one if `whole`); `empty` stands for a missing value
    where one is allowed (None: a missing value is an error)."""
    wanted = f"{field} must be {'a whole number' if whole else 'a number'} from {_bound(low)} to {_bound(high)}"
    if value is None and empty is not None:
        return empty
    if not is_real(value) or not math.isfinite(value):
        raise ValueError(f"{wanted}; got {_shown(value)}")
    if (whole and value != int(value)) or not low <= value <= high:
        raise ValueError(f"{wanted}; got {_shown(value)}")
    return int(value) if whole else float(value)


def text(value, field: str, max_length: int) -> str:
    """A string of at most max_length characters that UTF-8 can encode (no lone surrogates)."""
    if not isinstance(value, str):
        raise ValueError(f"{field} must be text; got {_shown(value)}")
    if len(value) > max_length:
        raise ValueError(f"{field} is {len(value):,} characters long; the most is {max_length:,}")
    at = lone_surrogate(value)
    if at is not None:
        raise ValueError(
            f"{field} holds an unpaired surrogate (U+{ord(value[at]):04X} at character {at}), which is not "
            "text any model can read; remove it or send the whole character"
        )
    return value


def flag(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false; got {_shown(value)}")
    return value


def choice(value, field: str, choices: list) -> str:
    """One of `choices`, compared as text (a dropdown's choices are listed as strings by the API)."""
    for option in choices:
        if value == option or (isinstance(value, (int, str)) and not isinstance(value, bool) and str(value) == str(option)):
            return option
    listed = ", ".join(str(c) for c in choices) or "none"
    raise ValueError(f"{field} must be one of: {listed}; got {_shown(value)}")
