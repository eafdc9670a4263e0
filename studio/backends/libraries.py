"""Optional kernel libraries, registered as plugins like anyone's and checked alike.

    sage            SageAttention (pip install sageattention): Q·Kᵀ in INT8, P·V in FP16/FP8, CUDA
    hub-flash-attn  FlashAttention from the Hugging Face kernels hub, by id (pip install kernels;
                    CUDA; a network the first time, to fetch the kernel)

Both are registered at import of studio.backends whether or not their library is installed;
the library is looked for only when a backend is asked about a CUDA device, and its absence is
the reason `available()` gives. Another hub kernel with FlashAttention's interface:

    libraries.register_hub_attention("kernels-community/flash-attn3", name="hub-flash-attn3")

Depends on torch and plugins (sageattention and kernels optionally, imported when first asked);
never on a pipeline, the UI or a model library.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from .plugins import register_attention
from .registry import error_line

HALF = (torch.float16, torch.bfloat16)


def sage_attention(q, k, v, causal, mask, scale):
    from sageattention import sageattn

    # "HND" is the studio's own layout, [batch, heads, seq, head_dim]: no transposes
    return sageattn(q, k, v, tensor_layout="HND", is_causal=causal, sm_scale=scale)


def sage_requirement(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("sageattention") is None:
        return "SageAttention is not installed (pip install sageattention; it needs a CUDA GPU and Triton)"
    return None


def hub_flash_attention(repo_id: str):
    """A kernel with the studio's calling convention around the hub kernel `repo_id`'s flash_attn_func."""

    def run(q, k, v, causal, mask, scale):
        # flash-attn wants [batch, seq, heads, head_dim]; its causal mask is bottom-right, as ours
        out = _hub_kernel(repo_id).flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal
        )
        out = out[0] if isinstance(out, tuple) else out  # some builds also return the log-sum-exp
        return out.transpose(1, 2)

    return run


def hub_requirement(repo_id: str):
    def requirement(device: torch.device, dtype: torch.dtype) -> str | None:
        if importlib.util.find_spec("kernels") is None:
            return f"the Hugging Face kernels package is not installed (pip install kernels), so {repo_id} cannot be fetched"
        try:
            kernel = _hub_kernel(repo_id)
        except Exception as error:  # no network, an unknown id, no build for this torch and GPU
            return f"{repo_id} could not be loaded from the hub: {error_line(error)}"
        if not hasattr(kernel, "flash_attn_func"):
            return f"{repo_id} has no flash_attn_func; this adapter needs FlashAttention's interface"
        return None

    return requirement


@functools.cache
def _hub_kernel(repo_id: str):
    from kernels import get_kernel

    return get_kernel(repo_id)


def register_hub_attention(repo_id: str, name: str | None = None, *, auto: bool = False) -> str:
    """Register the hub kernel `repo_id` (one with flash-attn's flash_attn_func) as attention
    backend `name` (default: "hub-" and the repository's name); returns the name. Nothing is
    fetched until the backend is first asked about a CUDA device."""
    name = name or "hub-" + repo_id.rsplit("/", 1)[-1].lower()
    register_attention(
        name, hub_flash_attention(repo_id),
        description=f"FlashAttention from the Hugging Face kernels hub ({repo_id}), fetched on first use",
        devices=("cuda",), dtypes=HALF, masks=False, auto=auto, requirement=hub_requirement(repo_id),
    )
    return name


def register_libraries() -> None:
    register_attention(
        "sage", sage_attention,
        description="SageAttention: Q·Kᵀ in INT8 with smoothed K, P·V in FP16 (FP8 on Ada and Hopper)",
        # its causal mask is aligned to the start of the keys, not the end: declared not causal
        devices=("cuda",), dtypes=HALF, causal=False, masks=False, head_dims=(64, 96, 128),
        requirement=sage_requirement,
    )
    register_hub_attention("kernels-community/flash-attn")
