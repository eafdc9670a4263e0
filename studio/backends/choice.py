"""Choosing backends: one rule for both kinds and both lanes.

    with backends.use(attention="eager", precision="bf16"):   # a scope ...
        llm("The cat sat")                                      # ... beats the pipeline's default

The rule: a `use()` scope's choice, where it made one, beats the pipeline's default (its
`attention=` / `precision=`), which beats "auto" and each model's own dtype. A lane reads the
choice once, when its stream() is called, and keeps it for the whole run.

Depends on the sibling modules attention, precision and registry; never on a pipeline.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from torch import nn

from .attention import check_name as check_attention
from .precision import apply_precision, check_name as check_precision, precision_of, restore_precision
from .registry import Selection, current, scoped


@contextlib.contextmanager
def use(attention: str | None = None, precision: str | None = None):
    """Choose the attention kernel and/or matmul precision for the enclosed block.

    `attention` applies to every `backends.attention(...)` call without an explicit `backend=`,
    and so to every model wired through `studio.integrations`. `precision` is read by the
    pipelines, which convert their models' linear layers before running (see precision.py).
    Both beat a pipeline's own default.
    """
    changes = {}
    if attention is not None:
        check_attention(attention)
        changes["attention"] = attention
    if precision is not None:
        check_precision(precision)
        changes["precision"] = precision
    with scoped(replace(current(), **changes)) as selection:
        yield selection


def resolve(attention: str | None = None, precision: str | None = None) -> Selection:
    """The choice for a run of a pipeline whose defaults are `attention` and `precision`: the
    current scope's where it made one, else the defaults."""
    scope = current()
    return Selection(attention=scope.attention or attention, precision=scope.precision or precision)


def sync_precision(models: list[nn.Module | None], precision: str | None) -> None:
    """Bring the linear layers of `models` (None: absent) to `precision`; None restores each
    model's own. Models already there are left alone, so calling it per run costs nothing."""
    for model in models:
        if model is None or precision == precision_of(model):
            continue
        if precision is None:
            restore_precision(model)
        else:
            apply_precision(model, precision)
