"""What a backend is, and the scoped choice of one.

Two kinds of backend exist: attention kernels (attention.py) and matmul precisions
(precision.py). Both describe themselves with a `BackendInfo`, so that `available()` can list
them side by side with the reason a backend cannot run here. The choice of backend is a
context variable: `use()` (choice.py) sets it for a block of code (and for everything that
block calls), then restores the previous choice, so two pipelines or two threads never see
each other's.

Depends on the standard library only; imports none of its siblings (they all import it).
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BackendInfo:
    name: str
    kind: str  # "attention" | "precision"
    available: bool
    reason: str | None  # why it cannot run here; None when it can
    description: str


class BackendError(ValueError):
    """An unknown or unavailable backend, or inputs a backend cannot take.

    The message always names the problem and what to use instead; nothing falls back silently.
    """


@dataclass(frozen=True)
class Selection:
    attention: str | None = None  # None: not chosen here (a pipeline's default, else "auto")
    precision: str | None = None  # None: not chosen here (a pipeline's default, else each model's own dtype)


_selection: contextvars.ContextVar[Selection] = contextvars.ContextVar("studio_backends", default=Selection())


def current() -> Selection:
    """The attention kernel and matmul precision a `use()` scope chose for the code running now."""
    return _selection.get()


@contextlib.contextmanager
def scoped(selection: Selection):
    """Make `selection` the current choice for the enclosed block (names are not checked here:
    `use()` checks them)."""
    token = _selection.set(selection)
    try:
        yield selection
    finally:
        _selection.reset(token)
