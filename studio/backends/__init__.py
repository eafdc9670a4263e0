"""The shared backends both lanes run on: attention kernels and matmul precisions.

    from studio import backends
    backends.available()                       # every backend, with the reason one cannot run here
    with backends.use(attention="eager", precision="bf16"):   # beats a pipeline's own default
        ...
    out = backends.attention(q, k, v, causal=True, backend="sdpa")
    report = backends.apply_precision(model, "int8")   # reversible: backends.restore_precision(model)
"""

from __future__ import annotations

import torch

from .attention import ATTENTION_BACKENDS, attention, attention_info, choose_attention
from .choice import resolve, sync_precision, use
from .precision import PRECISIONS, PrecisionReport, apply_precision, precision_info, precision_of, restore_precision
from .registry import BackendError, BackendInfo, Selection, current

__all__ = [
    "ATTENTION_BACKENDS",
    "PRECISIONS",
    "BackendError",
    "BackendInfo",
    "PrecisionReport",
    "Selection",
    "apply_precision",
    "attention",
    "attention_info",
    "available",
    "choose_attention",
    "current",
    "precision_info",
    "precision_of",
    "resolve",
    "restore_precision",
    "sync_precision",
    "use",
]


def available(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> list[BackendInfo]:
    """Every attention kernel and matmul precision, each saying whether it runs on `device`
    (default: CUDA when present, else the CPU) with `dtype` (default: the device's usual
    inference dtype, bf16 on CUDA and fp32 on the CPU), and if not, why."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return [attention_info(name, device, dtype) for name in ATTENTION_BACKENDS] + [
        precision_info(name, device) for name in PRECISIONS
    ]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
