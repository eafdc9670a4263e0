"""The shared backends both lanes run on: attention kernels and matmul precisions, built in or
registered by plugins.

    from studio import backends
    backends.available()                       # every backend, with the reason one cannot run here
    with backends.use(attention="eager", precision="bf16"):   # beats a pipeline's own default
        ...
    out = backends.attention(q, k, v, causal=True, backend="sdpa")
    report = backends.apply_precision(model, "int8")   # reversible: backends.restore_precision(model)
    backends.register_attention("mine", fn, description="...")   # checked against float64 before it runs

The modules, in the order they depend on each other: registry (what a backend is; the scoped
choice), checks (the float64 battery every backend must pass), attention and precision (the
built-ins and the tables of registered ones), plugins (registering, checking, discovering),
libraries (optional kernel libraries as plugins), choice (`use`, `resolve`). Importing this
package registers the libraries' kernels, then loads the installed plugins (entry-point group
`generation_studio.backends`); a plugin that fails is listed by `installed_plugins()` with its error.
"""

from __future__ import annotations

import torch

from .attention import ATTENTION_BACKENDS, attention, attention_info, attention_names, choose_attention
from .choice import resolve, sync_precision, use
from .libraries import register_libraries
from .plugins import GROUP, installed_plugins, load_entry_points, register_attention, register_precision, unregister
from .precision import (
    PRECISIONS,
    PrecisionReport,
    apply_precision,
    cpu_weight_format,
    precision_info,
    precision_names,
    precision_of,
    restore_precision,
)
from .registry import BackendError, BackendInfo, PluginSource, Selection, current, for_compiled_code

__all__ = [
    "ATTENTION_BACKENDS",
    "GROUP",
    "PRECISIONS",
    "BackendError",
    "BackendInfo",
    "PluginSource",
    "PrecisionReport",
    "Selection",
    "apply_precision",
    "attention",
    "attention_info",
    "attention_names",
    "available",
    "choose_attention",
    "cpu_weight_format",
    "current",
    "for_compiled_code",
    "installed_plugins",
    "load_entry_points",
    "precision_info",
    "precision_names",
    "precision_of",
    "register_attention",
    "register_precision",
    "resolve",
    "restore_precision",
    "sync_precision",
    "unregister",
    "use",
]


def available(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> list[BackendInfo]:
    """Every attention kernel and matmul precision, built in or registered, each saying whether
    it runs on `device` (default: CUDA when present, else the CPU) with `dtype` (default: the
    device's usual inference dtype, bf16 on CUDA and fp32 on the CPU), and if not, why. A
    registered backend is checked against the float64 reference the first time it is asked."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return [attention_info(name, device, dtype) for name in attention_names()] + [
        precision_info(name, device, dtype) for name in precision_names()
    ]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


register_libraries()
load_entry_points()
