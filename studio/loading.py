"""What both lanes do the same way when they load a model: the device and dtype to use, and the
safety rules (safetensors only unless the caller opts in; never trust_remote_code).

Depends on torch only.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class LoadError(ValueError):
    """A model could not be loaded; the message says why and what to do."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, the CPU otherwise; an explicit choice is checked, not second-guessed."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on the GPU (half the bytes, tensor cores), fp32 on the CPU (bf16 matmuls are slow there)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LoadError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_weights_format(folder: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a local folder whose weights are pickles: loading a pickle can run arbitrary code."""
    folder = Path(folder)
    if not folder.is_dir() or allow_pickle:
        return
    files = [p.name for p in folder.rglob("*") if p.is_file()]
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    pickles = [name for name in files if name.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    if pickles and not has_safetensors:
        raise LoadError(
            f"{folder} holds only pickle weights ({', '.join(sorted(pickles)[:3])}), which can run code when "
            "loaded; convert them to safetensors, or pass allow_pickle=True if you trust the source"
        )
