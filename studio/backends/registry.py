"""What a backend is, and the scoped choice of one.

Two kinds of backend exist: attention kernels (attention.py) and matmul precisions
(precision.py). Both describe themselves with a `BackendInfo`, so that `available()` can list
them side by side with the reason a backend cannot run here. The choice of backend is a
context variable: `use()` sets it for a block of code (and for everything that block calls),
then restores the previous choice, so two pipelines or two threads never see each other's.

Depends on torch only; never imports a pipeline or the UI.
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
    attention: str = "auto"
    precision: str | None = None  # None: keep each model's own dtype


_selection: contextvars.ContextVar[Selection] = contextvars.ContextVar("studio_backends", default=Selection())


def current() -> Selection:
    """The attention kernel and matmul precision chosen for the code running now."""
    return _selection.get()


@contextlib.contextmanager
def use(attention: str | None = None, precision: str | None = None):
    """Choose the attention kernel and/or matmul precision for the enclosed block.

    `attention` applies to every `backends.attention(...)` call without an explicit `backend=`,
    and so to every model wired through `studio.integrations`. `precision` is read by the
    pipelines, which convert their models' linear layers before running (see precision.py).
    """
    from .attention import check_name as check_attention
    from .precision import check_name as check_precision

    changes = {}
    if attention is not None:
        check_attention(attention)
        changes["attention"] = attention
    if precision is not None:
        check_precision(precision)
        changes["precision"] = precision
    token = _selection.set(replace(_selection.get(), **changes))
    try:
        yield _selection.get()
    finally:
        _selection.reset(token)
