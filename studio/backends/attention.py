"""Attention kernels behind one calling convention.

    out = attention(q, k, v, causal=False, mask=None, scale=None, backend="sdpa")

q is [batch, heads, q_len, head_dim]; k and v are [batch, kv_heads, kv_len, head_dim] with
kv_heads dividing heads (grouped-query attention); mask is boolean (True = attend) or additive
float, broadcastable to [batch, heads, q_len, kv_len]. causal=True aligns the queries with the
END of the keys, as when decoding with a KV cache: query i of q_len sees keys
0 .. kv_len - q_len + i. A query that may see no key at all (a padding row) gets zeros, as the
flash kernels return, instead of the NaN a softmax over nothing gives: a NaN there would reach
the real tokens through the next layer's values.

The kernels, from the textbook to the fast ones:
    eager      scores = Q·Kᵀ·scale, mask, softmax, ·V — materialises the [q_len, kv_len] matrix
    tiled      the FlashAttention algorithm in plain PyTorch: an online softmax over key blocks
    sdpa       torch's scaled_dot_product_attention, which picks its own kernel
    sdpa-*     the same with one kernel forced: flash, efficient, cudnn, math
    flex       FlexAttention, compiled (the first call per shape compiles: seconds)
    xformers   xformers.ops.memory_efficient_attention, where it is installed and runs
    auto       the fastest kernel available for the device, dtype and inputs, and says which

Kernels registered by plugins (plugins.py: `register_attention`) sit in REGISTERED and are called
the same way; each one says itself whether it runs on a device and dtype (it must have passed the
float64 check there) and whether it takes the inputs at hand.

Depends on torch (xformers optionally), registry and checks; knows nothing of plugins.py, models or
pipelines.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from .checks import device_missing
from .registry import BackendError, BackendInfo, current, dtype_name, failed_plugins_note

log = logging.getLogger(__name__)

_SDPA_KERNELS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}

DESCRIPTIONS = {
    "eager": "textbook attention; materialises the score matrix and can return the weights",
    "tiled": "FlashAttention's online softmax in plain PyTorch; never builds the full score matrix",
    "sdpa": "torch scaled_dot_product_attention; PyTorch picks the kernel",
    "sdpa-flash": "SDPA forced to the FlashAttention kernel",
    "sdpa-efficient": "SDPA forced to the memory-efficient kernel",
    "sdpa-cudnn": "SDPA forced to the cuDNN kernel",
    "sdpa-math": "SDPA forced to its reference math kernel",
    "flex": "FlexAttention compiled by torch.compile (compiles once per shape)",
    "xformers": "xformers memory_efficient_attention",
    "auto": "the fastest available kernel for the device, dtype and inputs",
}
ATTENTION_BACKENDS = tuple(DESCRIPTIONS)  # the built-ins; attention_names() adds the registered ones


class RegisteredKernel(Protocol):
    """What a registered kernel (made by plugins.register_attention) answers to."""

    auto: bool  # whether auto may choose it, where it takes the inputs and passed the check

    def info(self, device: torch.device, dtype: torch.dtype) -> BackendInfo:
        """Whether it runs here (declared for the device and dtype, and checked), and if not, why."""

    def refusal(self, q, k, v, causal, mask) -> str | None:
        """Why it cannot take these inputs (a capability it does not declare), or None."""

    def __call__(self, q, k, v, causal, mask, scale) -> torch.Tensor:
        """The kernel, its errors and a wrong output turned into BackendError naming the plugin."""


REGISTERED: dict[str, RegisteredKernel] = {}  # filled and emptied by plugins.py only


def attention_names() -> list[str]:
    """Every attention backend: the built-ins, then the registered kernels."""
    return [*ATTENTION_BACKENDS, *REGISTERED]

# auto tries these in order, keeping the first that runs the inputs at hand. The order is the
# speed ranking measured on an H100 (shared/ANCHORS.md: cuDNN 0.12 ms, flash 0.23 ms, efficient
# 0.43 ms at S=4096); on the CPU only flash and math exist, and flash is the faster.
_AUTO_ORDER = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa")


def check_name(name: str) -> None:
    if name not in DESCRIPTIONS and name not in REGISTERED:
        raise BackendError(
            f"unknown attention backend {name!r}; available: {', '.join(attention_names())}{failed_plugins_note()}"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    return_weights: bool = False,
):
    """Attention of q over k, v with the chosen kernel (default: the one `backends.use()` chose).

    With return_weights=True (eager only) returns (output, weights [batch, heads, q_len, kv_len]).
    """
    name = backend or current().attention or "auto"
    check_name(name)
    _check_inputs(q, k, v, causal, mask)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    if name == "auto":
        if return_weights:
            raise BackendError("only the eager backend materialises attention weights; got backend 'auto'")
        return _run_auto(q, k, v, causal, mask, scale)
    elif name in REGISTERED or not torch.compiler.is_compiling():
        # traced into a compiled graph, a built-in kernel that cannot run here fails the compile,
        # which the lanes fall back from to eager code, where this check says why
        _check_can_run(name, q, k, v, causal, mask)
    if return_weights and name != "eager":
        raise BackendError(f"only the eager backend materialises attention weights; got backend {name!r}")
    if name == "eager":
        out, weights = eager_attention(q, k, v, causal, mask, scale)
        return (out, weights) if return_weights else out
    return run_kernel(name, q, k, v, causal, mask, scale)


@torch.compiler.disable  # a plugin's first use runs its float64 check: Python, never traced into a graph
def _check_can_run(name: str, q, k, v, causal, mask) -> None:
    info = attention_info(name, q.device, q.dtype)
    if not info.available:
        raise BackendError(
            f"attention backend {name!r} is unavailable: {info.reason}; "
            f"available: {', '.join(_available_names(q.device, q.dtype))}"
        )
    refusal = REGISTERED[name].refusal(q, k, v, causal, mask) if name in REGISTERED else None
    if refusal is not None:
        raise BackendError(f"attention backend {name!r} cannot take these inputs: {refusal}; choose another backend")


def run_kernel(name: str, q, k, v, causal, mask, scale) -> torch.Tensor:
    """Kernel `name` (not auto) on inputs already checked, with the rows that see no key zeroed:
    the one path from the inputs to a kernel's output, for `attention` and for the plugins' check."""
    if name == "eager":
        return eager_attention(q, k, v, causal, mask, scale)[0]
    kernel = REGISTERED[name] if name in REGISTERED else _KERNELS[name]
    return _zero_rows_that_see_nothing(kernel(q, k, v, causal, mask, scale), mask, causal)


# ---------------------------------------------------------------------------------------------
# The kernels. Each takes (q, k, v, causal, mask, scale) with inputs already checked.


def eager_attention(q, k, v, causal, mask, scale):
    """The textbook: every score is computed and kept, which is what the other kernels avoid."""
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale  # [batch, heads, q_len, kv_len]
    mask = _with_causal(mask, causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # softmax in fp32: bf16 has 8 bits of mantissa, too few to normalise over thousands of keys
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return weights @ v, weights


def tiled_attention(q, k, v, causal, mask, scale, block_q: int = 64, block_k: int = 64):
    """FlashAttention (Dao et al., 2022) without the GPU: the score matrix is never built.

    For each block of queries we walk the keys block by block, keeping three running values per
    query: the largest score seen so far (m), the softmax denominator (l) and the weighted sum of
    values (acc). When a new block raises the maximum, the old l and acc are rescaled by
    exp(m_old - m_new) — the "online softmax" — so one pass gives the exact result. Memory is
    O(block_q × block_k) instead of O(q_len × kv_len). Readable, exact, and slow in Python.
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    q_len, kv_len = q.shape[-2], k.shape[-2]
    offset = kv_len - q_len  # bottom-right causal alignment
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q_len, kv_len)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    for q0 in range(0, q_len, block_q):
        q1 = min(q0 + block_q, q_len)
        q_block = q[..., q0:q1, :].float() * scale
        m = torch.full((*q_block.shape[:-1], 1), float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(*q_block.shape[:-1], v.shape[-1], device=q.device)
        # with a causal mask, key blocks that start after this block's last visible key are skipped
        k_end = min(kv_len, q1 + offset) if causal else kv_len
        for k0 in range(0, k_end, block_k):
            k1 = min(k0 + block_k, kv_len)
            s = q_block @ k[..., k0:k1, :].float().transpose(-2, -1)
            if mask is not None:
                block = mask[..., q0:q1, k0:k1]
                s = s.masked_fill(~block, float("-inf")) if block.dtype == torch.bool else s + block.float()
            if causal:
                visible = torch.arange(k0, k1, device=q.device) <= torch.arange(q0, q1, device=q.device)[:, None] + offset
                s = s.masked_fill(~visible, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # a row that has seen only -inf keeps m_new = -inf; use 0 there so exp() gives 0, not NaN
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe)
            correction = torch.exp(m - m_safe)
            l = l * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ v[..., k0:k1, :].float()
            m = m_new
        out[..., q0:q1, :] = torch.where(l > 0, acc / l.clamp_min(torch.finfo(l.dtype).tiny), 0.0).to(q.dtype)
    return out


def _sdpa(kernel: SDPBackend | None):
    def run(q, k, v, causal, mask, scale):
        q_len, kv_len = q.shape[-2], k.shape[-2]
        gqa = q.shape[1] != k.shape[1]
        # Native GQA (no copy of K and V) exists in the flash and math kernels, and only without a
        # mask; otherwise the kernel would fall back, so we repeat the heads ourselves.
        native_gqa = gqa and mask is None and kernel in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
        if gqa and not native_gqa:
            k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        is_causal = False
        if causal and mask is None and q_len == kv_len:
            is_causal = True  # SDPA's own causal flag (top-left) equals bottom-right when square
        elif causal and mask is None and q_len > 1:
            mask = causal_lower_right(q_len, kv_len)
        elif causal:
            mask = _with_causal(mask, causal, q_len, kv_len, q.device)
        kwargs = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=native_gqa)
        if kernel is None:
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    return run


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic shapes: decoding grows the keys by one every step, and a static compile would
    # recompile per length until dynamo gives up and runs the slow unfused version
    return torch.compile(flex_attention, dynamic=True)


@functools.lru_cache(maxsize=64)
def _causal_block_mask(q_len: int, kv_len: int, device: torch.device):
    """The block mask of bottom-right causal attention, built once per shape (building it costs
    about as much as a small attention call)."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = kv_len - q_len

    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return create_block_mask(causal_mask, None, None, q_len, kv_len, device=device)


def flex_attention(q, k, v, causal, mask, scale):
    q_len, kv_len = q.shape[-2], k.shape[-2]
    # the block mask lets FlexAttention skip key blocks above the diagonal entirely; one query at
    # the end of the keys (a decode step) sees them all, so it needs none
    block_mask = _causal_block_mask(q_len, kv_len, q.device) if causal and q_len > 1 else None
    score_mod = None
    if mask is not None:
        full = mask.expand(q.shape[0], q.shape[1], q_len, kv_len)
        if full.dtype == torch.bool:

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(full[b, h, q_idx, kv_idx], score, float("-inf"))

        else:

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + full[b, h, q_idx, kv_idx]

    return _compiled_flex()(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def xformers_attention(q, k, v, causal, mask, scale):
    import xformers.ops as xops

    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    q_len, kv_len = q.shape[-2], k.shape[-2]
    bias = _with_causal(mask, causal, q_len, kv_len, q.device) if mask is not None else None
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill(~bias, float("-inf"))
        bias = bias.expand(q.shape[0], q.shape[1], q_len, kv_len)
    elif causal:
        bias = xops.LowerTriangularFromBottomRightMask()
    # xformers wants [batch, seq, heads, head_dim]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale
    )
    return out.transpose(1, 2)


_KERNELS = {
    "tiled": tiled_attention,
    "sdpa": _sdpa(None),
    **{name: _sdpa(kernel) for name, kernel in _SDPA_KERNELS.items()},
    "flex": flex_attention,
    "xformers": xformers_attention,
}


# ---------------------------------------------------------------------------------------------
# Availability and the auto choice.


def attention_info(name: str, device: torch.device | str, dtype: torch.dtype) -> BackendInfo:
    """Whether kernel `name` runs on `device` with `dtype`, and if not, why (probed or, for a
    registered kernel, checked against the float64 reference; then cached)."""
    check_name(name)
    device = torch.device(device)
    if name in REGISTERED:
        return REGISTERED[name].info(device, dtype)
    return _builtin_info(name, device, dtype)


@functools.lru_cache(maxsize=None)
def _builtin_info(name: str, device: torch.device, dtype: torch.dtype) -> BackendInfo:
    reason = _unavailable_reason(name, device, dtype)
    return BackendInfo(name, "attention", reason is None, reason, DESCRIPTIONS[name])


def _unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    if device_missing(device):
        return device_missing(device)
    if name in ("eager", "tiled", "sdpa", "auto"):
        return None
    if name in ("sdpa-efficient", "sdpa-cudnn") and device.type != "cuda":
        return f"SDPA's {name.removeprefix('sdpa-')} kernel exists only for CUDA GPUs, not {device.type}"
    if name in _SDPA_KERNELS:
        return _probe(name, device, dtype, head_dim=64, masked=False)
    if name == "flex":
        if device.type not in ("cuda", "cpu"):
            return f"FlexAttention runs on CUDA and the CPU, not {device.type}"
        if device.type == "cpu" and not shutil.which("cc") and not shutil.which("gcc"):
            return "FlexAttention on the CPU is compiled by inductor, which needs a C compiler (none on PATH)"
        if device.type == "cpu" and dtype == torch.float16:
            return "FlexAttention on the CPU supports float32 and bfloat16, not float16"
        return None
    if name == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as error:  # ImportError, or a broken binary extension raising anything
            return f"xformers is not installed or does not import ({error}); pip install 'generation-studio[xformers]'"
        return _probe(name, device, dtype, head_dim=64, masked=False)
    raise AssertionError(name)


@functools.lru_cache(maxsize=None)
def _probe(name, device, dtype, head_dim, masked, gqa=False, causal=False) -> str | None:
    """Run the kernel once on tiny inputs of this kind; None if it works, else why not.

    Probing is the only honest test: SDPA's kernels have conditions (GPU generation, dtype,
    head size, masks) that change between releases, and xformers wheels may not match torch.
    """
    q = torch.randn(1, 2, 8, head_dim, device=device, dtype=dtype)
    k = torch.randn(1, 1 if gqa else 2, 8, head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=device) if masked else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _KERNELS[name](q, k, k, causal, mask, 1.0 / math.sqrt(head_dim))
            return None
        except Exception as error:
            # SDPA explains why a kernel was skipped in warnings; its exception only says "none left"
            why = "; ".join(str(w.message).split("\n")[0] for w in caught if "sdp" in str(w.message).lower())
            return (why or str(error).split("\n")[0]) + f" ({device.type}, {dtype_name(dtype)}, head_dim {head_dim})"


@dataclass(frozen=True)
class AutoChoice:
    name: str
    reason: str


# Kernels that raised on real inputs of a kind after their probe on small square ones passed:
# auto passes them over for inputs of that kind from then on. kind: see _run_auto.
_AUTO_FAILED: dict[tuple, set[str]] = {}


def _run_auto(q, k, v, causal, mask, scale) -> torch.Tensor:
    """auto's kernel on these inputs; if it raises (its probe ran on small square shapes, and real
    ones, a 77-token text or one decoding query over a long cache, can differ), the next kernel in
    line, and that kernel is passed over for inputs of this kind for good. Plain SDPA runs
    everything, so its failure is the inputs' and is raised."""
    if torch.compiler.is_compiling():
        # traced once into a compiled graph: the built-in choice for these inputs is a constant of
        # the graph (a kernel that fails there fails the compile, which the lanes fall back from)
        name = _built_in_choice(q.device, q.dtype, q.shape[-1], mask is not None, q.shape[1] != k.shape[1], causal)
        return run_kernel(name, q, k, v, causal, mask, scale)
    kind = (q.device, q.dtype, q.shape[-1], mask is not None, q.shape[1] != k.shape[1], causal, q.shape[-2] == 1)
    while True:
        choice = choose_attention(q, k, v, causal=causal, mask=mask, excluded=frozenset(_AUTO_FAILED.get(kind, ())))
        try:
            return run_kernel(choice.name, q, k, v, causal, mask, scale)
        except RuntimeError as error:
            if choice.name == "sdpa":
                raise
            _AUTO_FAILED.setdefault(kind, set()).add(choice.name)
            log.warning("attention auto: %s failed on these inputs (%s); the next kernel takes them from now on",
                        choice.name, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)


def choose_attention(q, k, v, causal: bool = False, mask: torch.Tensor | None = None,
                     excluded: frozenset[str] = frozenset()) -> AutoChoice:
    """The kernel `auto` uses for these inputs, and why: a registered kernel that asked for auto
    (registration order), where it takes these inputs and passed the check on this device and
    dtype; else the first of cuDNN, flash, efficient, plain SDPA (fastest first) that runs this
    device, dtype, head size, mask and head grouping."""
    skipped = []
    for name, kernel in REGISTERED.items():
        if not kernel.auto or name in excluded:
            continue
        reason = kernel.info(q.device, q.dtype).reason or kernel.refusal(q, k, v, causal, mask)
        if reason is None:
            why = f"registered for auto, takes these inputs and passed the check on {q.device.type} {dtype_name(q.dtype)}"
            log.info("attention auto chose %s: %s", name, why)
            return AutoChoice(name, why)
        skipped.append(f"{name}: {reason}")
    choice = _choose(q.device, q.dtype, q.shape[-1], mask is not None, q.shape[1] != k.shape[1], causal, excluded)
    return AutoChoice(choice.name, choice.reason + "".join(f"; skipped {why}" for why in skipped)) if skipped else choice


@torch.compiler.assume_constant_result
def _built_in_choice(device, dtype, head_dim, masked, gqa, causal) -> str:
    """_choose's kernel name, run at trace time rather than traced."""
    return _choose(device, dtype, head_dim, masked, gqa, causal).name


@functools.lru_cache(maxsize=None)
def _choose(device, dtype, head_dim, masked, gqa, causal, excluded=frozenset()) -> AutoChoice:
    skipped = []
    for name in _AUTO_ORDER:
        reason = attention_info(name, device, dtype).reason
        if reason is None and name in excluded:
            reason = "raised on real inputs of this kind"
        if reason is None and name != "sdpa":
            reason = _probe(name, device, dtype, head_dim, masked, gqa, causal)
        if reason is None:
            why = f"fastest that runs {device.type} {dtype_name(dtype)} head_dim {head_dim}"
            why += (", masked" if masked else "") + (", grouped heads" if gqa else "")
            if skipped:
                why += "; skipped " + "; ".join(skipped)
            log.info("attention auto chose %s: %s", name, why)
            return AutoChoice(name, why)
        skipped.append(f"{name}: {reason}")
    raise AssertionError("plain sdpa always runs")


def _available_names(device, dtype) -> list[str]:
    return [name for name in attention_names() if attention_info(name, device, dtype).available]


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels.


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, kv_heads, len, dim] -> [batch, heads, len, dim]: each K/V head serves heads/kv_heads queries."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _with_causal(mask, causal, q_len, kv_len, device):
    """Fold the bottom-right causal pattern into the mask (boolean, or additive if the mask is)."""
    if not causal:
        return mask
    visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)
    if mask is None:
        return visible
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf"))


def _zero_rows_that_see_nothing(out, mask, causal):
    """Zeros for the queries that may see no key, judged with the causal pattern applied: a
    left-padded prompt's padding rows see nothing only once causal hides the later keys, and a
    kernel's NaN there would reach the real tokens through the next layer's values (0 · NaN)."""
    if mask is None:
        return out
    visible = _with_causal(mask, causal, out.shape[-2], mask.shape[-1], out.device)
    if visible.dtype != torch.bool:
        visible = visible > float("-inf")
    return out.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)


def _check_inputs(q, k, v, causal, mask):
    for label, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise BackendError(f"attention expects {label} as [batch, heads, seq_len, head_dim]; got {shape}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise BackendError(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise BackendError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise BackendError(f"k and v must agree in batch, heads and length; got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise BackendError(f"q and k must share the batch size; got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise BackendError(f"q and k must share head_dim; got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[1] % k.shape[1]:
        raise BackendError(f"kv_heads ({k.shape[1]}) must divide heads ({q.shape[1]}) for grouped-query attention")
    if causal and q.shape[-2] > k.shape[-2]:
        raise BackendError(
            f"causal attention with more queries ({q.shape[-2]}) than keys ({k.shape[-2]}): "
            "the first queries would see nothing; pass the keys of the whole sequence"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
            raise BackendError("mask must be a boolean (True = attend) or additive float tensor")
        target = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        try:
            torch.broadcast_shapes(mask.shape, target)
        except RuntimeError:
            raise BackendError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to [batch, heads, q_len, kv_len] = {target}"
            ) from None
        if mask.device != q.device:
            raise BackendError(f"mask is on {mask.device} but q is on {q.device}")
