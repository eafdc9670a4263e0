"""The check every backend must pass: each against a float64 reference, on one battery of cases.

The built-in kernels and precisions are held to it by the tests; a registered (plugin) backend
is held to it by the studio itself, the first time it is used on a device and dtype (plugins.py).
One battery, so that "checked" means the same thing for both.

    error = attention_error(run, case, device, dtype)     # run(q, k, v, causal, mask, scale) -> out
    error = precision_error(wrap, case, device, dtype)    # wrap(nn.Linear) -> module computing it

Attention: causal and not, cross-attention, decoding with a KV cache, grouped-query heads, several
head sizes, boolean padding masks, additive masks and a query that sees no key. Precisions: one
random layer with and one without a bias, the relative error predicted from each format's bits.

Every random number comes from a local generator on the CPU, so a check never shifts a seeded
run and draws the same inputs on every device.

Depends on torch and registry only; never imports a kernel, a precision, a model or a pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .registry import BackendError, dtype_name, error_line

# ---------------------------------------------------------------------------------------------
# Attention


def reference_attention(q, k, v, causal=False, mask=None, scale=None) -> torch.Tensor:
    """Attention in float64, spelled out: the ground truth every kernel is checked against.
    A query that may see no key gets zeros (see attention.py)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * scale
    q_len, kv_len = q.shape[-2], k.shape[-2]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        for i in range(q_len):
            allowed[i, kv_len - q_len + i + 1 :] = False  # bottom-right: query i sees keys 0 .. kv_len - q_len + i
    allowed = allowed.expand_as(scores).clone()
    if mask is not None and mask.dtype == torch.bool:
        allowed &= mask.cpu().expand_as(scores)
    elif mask is not None:
        scores = scores + mask.cpu().double()
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


@dataclass(frozen=True)
class AttentionCase:
    """One input shape of the battery; `mask` is None, "padding" (boolean, the first keys of the
    first sequence are padding), "additive" (random float, the first 3 keys at -inf) or
    "empty-row" (boolean, one query of the first sequence sees no key at all)."""

    name: str
    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    q_len: int = 16
    kv_len: int = 16
    head_dim: int = 64
    causal: bool = False
    mask: str | None = None

    def needs(self) -> dict[str, bool]:
        """The capabilities a kernel must declare to be given this case (see plugins.py)."""
        return dict(
            causal=self.causal,
            masks=self.mask is not None,
            gqa=self.heads != self.kv_heads,
            cross=self.q_len != self.kv_len,
        )

    def inputs(self, device, dtype, seed: int = 0):
        """(q, k, v, mask) for this case on `device` in `dtype`, the same numbers everywhere."""
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

        q = randn(self.batch, self.heads, self.q_len, self.head_dim)
        k = randn(self.batch, self.kv_heads, self.kv_len, self.head_dim)
        v = randn(self.batch, self.kv_heads, self.kv_len, self.head_dim)
        mask = None
        if self.mask == "padding":  # left padding, [batch, 1, 1, kv_len]
            mask = torch.ones(self.batch, 1, 1, self.kv_len, dtype=torch.bool)
            mask[0, ..., : self.kv_len // 2] = False
        elif self.mask == "additive":  # one bias per head and query, [batch, heads, q_len, kv_len]
            mask = torch.randn(self.batch, self.heads, self.q_len, self.kv_len, generator=generator)
            mask[..., :3] = float("-inf")
            mask = mask.to(dtype)
        elif self.mask == "empty-row":  # [batch, 1, q_len, kv_len]
            mask = torch.ones(self.batch, 1, self.q_len, self.kv_len, dtype=torch.bool)
            mask[0, :, 1] = False
        return q, k, v, (mask.to(device) if mask is not None else None)

    def __str__(self) -> str:
        shape = (f"heads {self.heads}, kv_heads {self.kv_heads}, q_len {self.q_len}, kv_len {self.kv_len}, "
                 f"head_dim {self.head_dim}")
        return f"{self.name!r} ({shape}{', causal' if self.causal else ''}{f', {self.mask} mask' if self.mask else ''})"


ATTENTION_CASES = {
    case.name: case
    for case in (
        AttentionCase("self"),
        AttentionCase("causal", causal=True),
        AttentionCase("cross", q_len=5, kv_len=23),
        AttentionCase("decode-causal", q_len=1, kv_len=23, causal=True),  # one new token over a KV cache
        AttentionCase("chunk-causal", q_len=7, kv_len=23, causal=True),  # a prompt continuing a KV cache
        AttentionCase("gqa-causal", heads=8, kv_heads=2, causal=True),
        *(AttentionCase(f"head-dim-{d}", q_len=9, kv_len=9, head_dim=d, causal=True) for d in (32, 64, 80, 128)),
        AttentionCase("padding-causal", q_len=12, kv_len=12, causal=True, mask="padding"),
        AttentionCase("additive", q_len=6, kv_len=10, mask="additive"),
        AttentionCase("empty-row", q_len=4, kv_len=4, mask="empty-row"),
    )
}

# Largest error allowed, relative to max(1, the largest reference output), per input dtype: a few
# roundings of the dtype's significand, fp16 an eighth of bf16's (3 bits more). The worst built-in
# on the CPU, eager (it rounds the weights to the dtype before P·V), measured 6.4e-7, 7.1e-4, 6.6e-3.
ATTENTION_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2.5e-3,
    torch.bfloat16: 2e-2,
}


def attention_error(run: Callable, case: AttentionCase, device, dtype) -> float:
    """The largest error of `run(q, k, v, causal, mask, scale)` against the reference on `case`,
    relative as ATTENTION_TOLERANCE is. Raises CheckFailure naming the case when the output is
    not a tensor of the right shape, dtype and device, or holds NaN."""
    q, k, v, mask = case.inputs(device, dtype)
    scale = 1 / math.sqrt(case.head_dim)
    try:
        out = run(q, k, v, case.causal, mask, scale)
    except Exception as error:
        raise CheckFailure(f"case {case}: {error if isinstance(error, BackendError) else error_line(error)}") from error
    expected = reference_attention(q, k, v, case.causal, mask, scale)
    _check_output(out, tuple(expected.shape), dtype, torch.device(device), f"case {case}")
    if torch.isnan(out).any():
        raise CheckFailure(f"case {case} returned NaN")
    return (out.double().cpu() - expected).abs().max().item() / max(1.0, expected.abs().max().item())


def check_attention(run: Callable, device, dtype, cases=None) -> None:
    """Run `run` on every case (default: the whole battery); raise CheckFailure on the first one
    outside the tolerance for `dtype`, naming the case and the measured error."""
    tolerance = ATTENTION_TOLERANCE.get(dtype)
    if tolerance is None:
        raise CheckFailure(f"no tolerance for {dtype}; the battery knows {', '.join(map(str, ATTENTION_TOLERANCE))}")
    for case in ATTENTION_CASES.values() if cases is None else cases:
        error = attention_error(run, case, device, dtype)
        if not error <= tolerance:
            raise CheckFailure(f"case {case}: max error {error:.2e} > tolerance {tolerance:.0e} for {dtype_name(dtype)}")


def cases_for(head_dims=None, **declared: bool) -> list[AttentionCase]:
    """The battery cut to what a kernel declares: cases needing an undeclared capability are
    left out, and a head size it does not take is replaced by the nearest one it does."""
    cases = []
    for case in ATTENTION_CASES.values():
        if any(needed and not declared.get(capability, True) for capability, needed in case.needs().items()):
            continue
        if head_dims and case.head_dim not in head_dims:
            case = replace(case, head_dim=min(head_dims, key=lambda d: (abs(d - case.head_dim), d)))
        if case not in cases:
            cases.append(case)
    return cases


# ---------------------------------------------------------------------------------------------
# Matmul precisions

# Relative error ||y - y64|| / ||y64|| of one random 256 -> 128 layer on x ~ N(0, 1), against the
# same layer in float64, predicted from the formats: rounding to a p-bit significand leaves a
# relative rms error of 0.425 * 2^-p (measured on N(0, 1) samples; the same for every p), and the
# roundings of independent operands add in quadrature. Each bound is the prediction / 1.5 and
# * 1.5: the upper one catches a precision doing worse than its format allows (e.g. truncating
# instead of rounding), the lower one proves the layer really computed in that format.
ROUNDING = 0.425
PREDICTED_ERROR = {
    "fp16": ROUNDING * 2**-11 * 3**0.5,  # x, w and the output each rounded once [measured 3.4e-4 of 3.6e-4]
    "bf16": ROUNDING * 2**-8 * 3**0.5,  # the same with 3 bits fewer: 8x fp16's [2.7e-3 of 2.9e-3]
    # nn.Linear draws w ~ U(-b, b); a row's step is max|w| / 127 ~ b / 127, so the rounding rms
    # step / sqrt(12) over the weights' rms b / sqrt(3) is 1 / 254 [3.9e-3 of 3.9e-3]
    "int8": 1 / 254,
    "fp8": ROUNDING * 2**-4 * 2**0.5,  # x and w rounded to e4m3; its bf16 output adds little [3.5e-2 of 3.8e-2]
}
ERROR_BOUNDS = {name: (error / 1.5, error * 1.5) for name, error in PREDICTED_ERROR.items()}
# fp32 is the reference's own format: what is left is the order of 256 fp32 additions [2.1e-7]
ERROR_BOUNDS["fp32"] = (0.0, 1e-6)
# The error a layer of this dtype has before any precision is applied: the bound of computing in it.
DTYPE_BOUND = {torch.float64: 1e-12, torch.float32: ERROR_BOUNDS["fp32"][1], torch.float16: ERROR_BOUNDS["fp16"][1],
               torch.bfloat16: ERROR_BOUNDS["bf16"][1]}


@dataclass(frozen=True)
class LayerCase:
    name: str
    in_features: int
    out_features: int
    bias: bool
    input_shape: tuple[int, ...]  # the last is in_features

    def layer_and_input(self, device, dtype, seed: int = 0):
        """A layer drawn as nn.Linear draws (w, b ~ U(-1/sqrt(in), 1/sqrt(in))) and x ~ N(0, 1)."""
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(self.in_features)
        layer = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(self.out_features, self.in_features, generator=generator) * 2 * bound - bound)
            if self.bias:
                layer.bias.copy_(torch.rand(self.out_features, generator=generator) * 2 * bound - bound)
        x = torch.randn(*self.input_shape, generator=generator)
        return layer.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)

    def __str__(self) -> str:
        bias = "with" if self.bias else "without"
        return f"{self.name!r} ({self.in_features} -> {self.out_features} {bias} bias, input {list(self.input_shape)})"


LAYER_CASES = {
    case.name: case
    for case in (
        LayerCase("bias", 256, 128, True, (4, 8, 256)),
        LayerCase("no-bias", 128, 64, False, (5, 128)),
    )
}


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double().cpu() - reference.double().cpu()).norm() / reference.double().cpu().norm()).item()


def reference_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer in float64, on the very values (of its dtype) it holds."""
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


def precision_error(wrap: Callable, case: LayerCase, device, dtype) -> float:
    """The relative error of the module `wrap(layer)` against the float64 layer on `case`. Raises
    CheckFailure naming the case when the module is not a module, changes the original's
    weights, or returns the wrong shape or dtype, or NaN."""
    layer, x = case.layer_and_input(device, dtype)
    saved = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        try:
            module = wrap(layer)
            if not isinstance(module, nn.Module):
                raise CheckFailure(f"conversion returned {type(module).__name__}, not an nn.Module")
            y = module(x)
        except Exception as error:
            raise CheckFailure(f"case {case}: {error if isinstance(error, BackendError) else error_line(error)}") from error
    if any(not torch.equal(p, s) for p, s in zip(layer.parameters(), saved)):
        raise CheckFailure(f"case {case}: conversion changed the original layer's weights (restoring would not be exact)")
    _check_output(y, (*x.shape[:-1], case.out_features), dtype, torch.device(device), f"case {case}")
    if torch.isnan(y).any():
        raise CheckFailure(f"case {case} returned NaN")
    return relative_error(y, reference_linear(layer, x))


def precision_bound(max_error: float, dtype) -> float:
    """The error allowed to a precision that declares `max_error` on layers of `dtype`: the two
    errors are independent and add in quadrature."""
    return math.hypot(max_error, DTYPE_BOUND.get(dtype, 0.0))


def check_precision(wrap: Callable, device, dtype, max_error: float) -> None:
    """Run `wrap` on every layer case; raise CheckFailure on the first one whose relative error is
    above `max_error` (with the dtype's own rounding added), naming the case and the error."""
    bound = precision_bound(max_error, dtype)
    for case in LAYER_CASES.values():
        error = precision_error(wrap, case, device, dtype)
        if not error <= bound:
            raise CheckFailure(f"case {case}: relative error {error:.2e} > bound {bound:.1e} for {dtype_name(dtype)}")


# ---------------------------------------------------------------------------------------------


def device_missing(device: torch.device) -> str | None:
    """Why nothing at all runs on `device` here (asked before any backend is probed or checked)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available here (no NVIDIA GPU, or a CPU-only torch build)"
    return None


class CheckFailure(BackendError):
    """A backend's output failed the check; the message names the case and the measured error."""


def describe(out) -> str:
    """What a backend returned, for a message saying it was not what the contract asks."""
    if isinstance(out, torch.Tensor):
        return f"a {dtype_name(out.dtype)} tensor of shape {tuple(out.shape)} on {out.device}"
    return f"a {type(out).__name__}, not a tensor"


def _check_output(out, shape, dtype, device, where: str) -> None:
    right = isinstance(out, torch.Tensor) and tuple(out.shape) == shape and out.dtype == dtype
    if not right or out.device.type != device.type:
        raise CheckFailure(
            f"{where} returned {describe(out)}; expected a {dtype_name(dtype)} tensor of shape {shape} on {device}"
        )


