"""What a backend is, and the scoped choice of one.

Two kinds of backend exist: attention kernels (attention.py) and matmul precisions
(precision.py). Both describe themselves with a `BackendInfo`, so that `available()` can list
them side by side with the reason a backend cannot run here. The choice of backend is a
context variable: `use()` (choice.py) sets it for a block of code (and for everything that
block calls), then restores the previous choice, so two pipelines or two threads never see
each other's. Code compiled by torch.compile, which cannot read a context variable, reads a
thread-local copy of the choice instead (`for_compiled_code`). Installed plugin packages
(plugins.py) leave a `PluginSource` each in SOURCES: what they registered, or why they failed to
load.

Depends on the standard library and torch; imports none of its siblings (they all import it).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from dataclasses import dataclass

import torch


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
class PluginSource:
    """One installed plugin (an entry point of group `generation_studio.backends`) and what came of loading it."""

    name: str  # the entry point's name
    value: str  # what it points at, "module:function"
    distribution: str | None  # the package that declares it, "name version"
    backends: tuple[str, ...]  # the names it registered; none when it failed
    error: str | None  # why it failed to load or to register, None when it did both


SOURCES: list[PluginSource] = []  # appended to by plugins.load_entry_points only


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16: how messages about backends name a dtype."""
    return str(dtype).removeprefix("torch.")


def error_line(error: BaseException) -> str:
    """"TypeError: first line of the message": how messages about backends quote an exception."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def failed_plugins_note() -> str:
    """A sentence for an "unknown backend" message when installed plugins failed to load ("" when none did)."""
    failed = [f"{s.name} ({s.error})" for s in SOURCES if s.error]
    return f"; plugins that failed to load (see `studio backends`): {'; '.join(failed)}" if failed else ""


@dataclass(frozen=True)
class Selection:
    attention: str | None = None  # None: not chosen here (a pipeline's default, else "auto")
    precision: str | None = None  # None: not chosen here (a pipeline's default, else each model's own dtype)


_NO_SELECTION = Selection()
_selection: contextvars.ContextVar[Selection] = contextvars.ContextVar("studio_backends", default=_NO_SELECTION)


# torch.compile cannot trace a ContextVar (every attention would break the graph there), but it
# traces a thread-local and guards on what it read, per calling thread: a call under another choice
# recompiles instead of running the kernel traced for the last one. Compiled code reads this copy.
_compiled_view = threading.local()


def current() -> Selection:
    """The attention kernel and matmul precision a `use()` scope chose for the code running now."""
    if torch.compiler.is_compiling():
        return getattr(_compiled_view, "selection", _NO_SELECTION)
    return _selection.get()


@contextlib.contextmanager
def _viewed_by_compiled_code(selection: Selection):
    outer = getattr(_compiled_view, "selection", _NO_SELECTION)
    _compiled_view.selection = selection
    try:
        yield
    finally:
        _compiled_view.selection = outer


def for_compiled_code():
    """Around a call into compiled code: hand it the choice the caller's context holds, whichever
    thread runs the call (a streamed generator can be resumed on another thread than the one that
    entered its `use()` scope)."""
    return _viewed_by_compiled_code(_selection.get())


@contextlib.contextmanager
def scoped(selection: Selection):
    """Make `selection` the current choice for the enclosed block (names are not checked here:
    `use()` checks them); code compiled by the caller on this thread sees it too."""
    token = _selection.set(selection)
    try:
        with _viewed_by_compiled_code(selection):
            yield selection
    finally:
        _selection.reset(token)
