"""Matmul precisions: run every nn.Linear of a model in fp32, tf32, bf16, fp16, int8 or fp8.

Almost all of an LLM's or a denoiser's FLOPs and weight bytes sit in its linear layers, so their
precision decides both speed and error. `apply_precision` swaps each nn.Linear for a small
wrapper that computes in the chosen precision and hands back the input's dtype, so the rest of
the model (norms, convolutions, attention scores, embeddings) never notices. Each wrapper keeps
the ORIGINAL nn.Linear as `.original` and never touches its parameters: restoring is exact, and
tied weights (an LLM's lm_head sharing the embedding matrix) stay tied. Converted weights are
computed once, at apply time.

    report = apply_precision(model, "int8", skip=["lm_head"])   # restores any earlier precision first
    print(report)                                              # what changed, what was skipped and why
    restore_precision(model)                                   # the original layers, bit for bit

Apply after the model is on its device and in its dtype: the converted weights are buffers, so a
later `.to(dtype)` would cast them too (restore, move, apply again instead).

Precisions registered by plugins (plugins.py: `register_precision`) sit in REGISTERED and are
applied the same way; each one says itself whether it runs on a device and dtype (it must have
passed the float64 check there) and wraps a layer in a PrecisionLinear of its own.

Depends on torch, registry and checks only; never imports plugins.py, a pipeline, the UI or a model library.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .checks import device_missing
from .registry import BackendError, BackendInfo, failed_plugins_note

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8", "fp8")  # the built-ins; precision_names() adds the registered

DESCRIPTIONS = {
    "fp32": "IEEE float32 matmuls (even if TF32 is enabled globally): the reference the others are measured against",
    "tf32": "float32 weights, TensorFloat-32 tensor-core matmuls (10-bit mantissa); NVIDIA compute capability >= 8.0",
    "bf16": "bfloat16 weights and matmuls: float32's range with 8 bits of mantissa, half the bytes",
    "fp16": "float16 weights and matmuls: 11 bits of mantissa, a narrow range, half the bytes (slow on CPU)",
    "int8": "int8 weights with per-output-channel scales, matmul in the activation dtype (weight-only, gpt-fast style)",
    "fp8": "float8 e4m3 weights and activations, per-channel and per-token scales, torch._scaled_mm; CUDA cc >= 8.9",
}

CAST_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# torch.backends.cuda.matmul.fp32_precision during a float32 matmul: "tf32" lets cuBLAS round the
# inputs to TF32; "ieee" keeps fp32 honest even where the process turned TF32 on globally.
FP32_MATMUL_MODE = {"fp32": "ieee", "tf32": "tf32"}

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448: the largest e4m3 number; scales map each row's max onto it


class RegisteredPrecision(Protocol):
    """What a registered precision (made by plugins.register_precision) answers to."""

    def info(self, device: torch.device, dtype: torch.dtype) -> BackendInfo:
        """Whether it runs here (declared for the device and dtype, and checked), and if not, why."""

    def wrap(self, layer: nn.Linear) -> PrecisionLinear:
        """`layer` converted, kept whole inside the wrapper as `.original`."""


REGISTERED: dict[str, RegisteredPrecision] = {}  # filled and emptied by plugins.py only


def precision_names() -> list[str]:
    """Every precision: the built-ins, then the registered ones."""
    return [*PRECISIONS, *REGISTERED]


def cpu_weight_format(device: torch.device) -> tuple[str | None, str]:
    """The weight format a model runs fastest in on `device` where it has no precision of its own
    (None: the model's own dtype), and why: what the LLM fast path lays its weights out in."""
    if device.type != "cpu":
        return None, f"on {device.type} the weights keep the model's own dtype"
    if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
        return "bf16", "this CPU multiplies bf16 in hardware (AMX or AVX512-BF16): bf16 weights, half the bytes of fp32"
    return None, "this CPU has no bf16 matmul instructions (AMX, AVX512-BF16), so bf16 would be emulated: fp32 weights"


def check_name(name: str) -> None:
    if name not in PRECISIONS and name not in REGISTERED:
        raise BackendError(
            f"unknown precision {name!r}; available: {', '.join(precision_names())}{failed_plugins_note()}"
        )


# --- the wrappers: one per way of computing a linear layer ------------------------------------


class PrecisionLinear(nn.Module):
    """What every wrapper shares: the original layer, kept whole, and the attributes libraries
    read from a linear layer. transformers and diffusers look at `layer.weight.dtype` or
    `.device` to decide an input's dtype, so `weight` and `bias` answer with the original's,
    exactly as the unconverted model would."""

    precision: str

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.original = original
        self.in_features = original.in_features
        self.out_features = original.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.original.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.original.bias

    def weight_bytes(self) -> int:
        """Bytes of the weights this layer's matmul reads on every forward pass."""
        return sum(b.nbytes for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"

    def __repr__(self) -> str:
        # One line: the original inside is an implementation detail of restoring.
        return f"{type(self).__name__}({self.extra_repr()})"


class CastLinear(PrecisionLinear):
    """fp32, tf32, bf16, fp16: the weight cast once to a float dtype, the input cast on the way
    in, the output cast back on the way out."""

    def __init__(self, original: nn.Linear, precision: str):
        super().__init__(original)
        self.precision = precision
        self.dtype = CAST_DTYPES[precision]
        # When the dtype already matches, .to() returns the same storage: no copy, no extra memory.
        self.register_buffer("weight_cast", original.weight.detach().to(self.dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.original.bias is None else self.original.bias.to(self.dtype)
        mode = FP32_MATMUL_MODE.get(self.precision)
        if mode is None:
            return F.linear(x.to(self.dtype), self.weight_cast, bias).to(x.dtype)
        # A process-wide flag (threads share it), so it is set only around this one matmul and
        # put back to exactly its previous value: code elsewhere that uses the legacy allow_tf32
        # API then never finds the two APIs mixed, which makes torch refuse to report the precision.
        matmul = torch.backends.cuda.matmul
        previous = matmul.fp32_precision
        matmul.fp32_precision = mode
        try:
            return F.linear(x.to(self.dtype), self.weight_cast, bias).to(x.dtype)
        finally:
            matmul.fp32_precision = previous

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, precision={self.precision}"


class Int8Linear(PrecisionLinear):
    """Weight-only int8, as in gpt-fast: each output row of the weight is stored as int8 times one
    float scale (symmetric, max |w| of the row -> 127).

    On the CPU the matmul is PyTorch's int8 kernel (`_weight_int8pack_mm`), which reads the int8
    weight as it is: a quarter of fp32's bytes, and the speed that buys. It takes bf16 inputs (a
    float32 input sends it down a path ~30x slower), so activations go in as bf16. Elsewhere the
    matmul runs in the activation dtype on the weight cast up (exact: every integer in [-127, 127]
    is a bf16 and an fp16 number), which torch.compile fuses into one kernel; the output is scaled
    instead of the weight, which saves dequantizing the whole matrix."""

    precision = "int8"

    def __init__(self, original: nn.Linear):
        super().__init__(original)
        w = original.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", torch.round(w / scales[:, None]).to(torch.int8), persistent=False)
        # the CPU kernel wants its scales in the input's dtype, bf16
        self.register_buffer("scales", scales.to(torch.bfloat16) if w.device.type == "cpu" else scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scales)
            out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight_int8.to(x.dtype)) * self.scales.to(x.dtype)
        if self.original.bias is not None:
            out = out + self.original.bias.to(x.dtype)
        return out


class Fp8Linear(PrecisionLinear):
    """float8 e4m3 weights and activations, multiplied by torch._scaled_mm. Weights get one scale
    per output channel (computed once), activations one scale per token (computed every call:
    their range is not known in advance). _scaled_mm multiplies in fp8, accumulates in fp32 and
    applies both scales; its output is bf16, the one dtype every row-wise-scaled kernel accepts
    (CUTLASS on compute capability 8.9, cuBLAS on 9.0, the CPU)."""

    precision = "fp8"

    def __init__(self, original: nn.Linear):
        super().__init__(original)
        w = original.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
        # Stored [out, in] row-major so that .t() is the column-major [in, out] _scaled_mm wants.
        self.register_buffer("weight_fp8", (w / scales[:, None]).to(torch.float8_e4m3fn), persistent=False)
        self.register_buffer("scales", scales[None, :].contiguous(), persistent=False)  # [1, out], float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        row_scales = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [tokens, 1]
        rows_fp8 = (rows / row_scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            rows_fp8, self.weight_fp8.t(), scale_a=row_scales, scale_b=self.scales, out_dtype=torch.bfloat16
        ).to(x.dtype)
        if self.original.bias is not None:
            out = out + self.original.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)


def wrap(layer: nn.Linear, name: str) -> PrecisionLinear:
    if name in REGISTERED:
        return REGISTERED[name].wrap(layer)
    if name == "int8":
        return Int8Linear(layer)
    if name == "fp8":
        return Fp8Linear(layer)
    return CastLinear(layer, name)


# --- availability ----------------------------------------------------------------------------


def precision_info(name: str, device: str | torch.device, dtype: torch.dtype = torch.float32) -> BackendInfo:
    """Whether `name` runs on `device` for layers of `dtype`, and if not, why. A built-in runs on
    layers of any float dtype where it runs at all; a registered one is checked per dtype."""
    check_name(name)
    device = torch.device(device)
    if name in REGISTERED:
        return REGISTERED[name].info(device, dtype)
    reason = hardware_requirement(name, device) or probe(name, str(device))
    return BackendInfo(name, "precision", reason is None, reason, DESCRIPTIONS[name])


def hardware_requirement(name: str, device: torch.device) -> str | None:
    """The documented limits, checked first so the reason names the hardware, not a kernel error."""
    if device_missing(device):
        return device_missing(device)
    if name == "tf32":
        if device.type != "cuda":
            return f"TF32 is a mode of NVIDIA tensor cores (compute capability >= 8.0); {device.type} has none"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"TF32 needs compute capability >= 8.0 (Ampere); this GPU is {major}.{minor}"
    if name == "fp8" and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"fp8 matmuls need compute capability >= 8.9 (Ada, Hopper); this GPU is {major}.{minor}"
    return None


@functools.lru_cache(maxsize=None)
def probe(name: str, device: str) -> str | None:
    """Run one 16x16 layer in this precision on the device; the error, if any, is the reason.
    Cached: a kernel that is missing now stays missing for the life of the process."""
    try:
        # skip_init + eye: no draw from the global RNG, so a probe never shifts a seeded run.
        layer = nn.utils.skip_init(nn.Linear, 16, 16, device=device)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(16))
            layer.bias.zero_()
        wrap(layer, name)(torch.ones(2, 16, device=device))
    except Exception as error:  # any failure means the same thing: this precision does not run here
        first_line = str(error).strip().split("\n")[0]
        return f"{name} does not run on {device}: {type(error).__name__}: {first_line}"
    return None


# --- converting a model ----------------------------------------------------------------------


@dataclass
class PrecisionReport:
    precision: str
    changed: list[str] = field(default_factory=list)  # qualified names of the converted nn.Linear layers
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (qualified name, why it was left alone)
    bytes_before: int = 0  # weight bytes of the changed layers as loaded
    bytes_after: int = 0  # weight bytes their matmuls read now (the originals stay in memory for restoring)

    def __str__(self) -> str:
        total = len(self.changed) + len(self.skipped)
        lines = [
            f"{self.precision}: {len(self.changed)} of {total} linear layers converted, "
            f"weights {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"
        ]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def apply_precision(model: nn.Module, name: str, *, skip=()) -> PrecisionReport:
    """Run every nn.Linear of `model` in precision `name`, except those whose qualified name
    matches one of the fnmatch patterns in `skip` (e.g. "lm_head", "*.attn1.*"). Any earlier
    precision on the model is restored first, so applying twice replaces rather than stacks.
    Raises BackendError, with the model left as it was, if `name` cannot run on a layer's device
    and dtype; if a registered precision fails to convert a layer, with the model restored to its
    own precision."""
    check_name(name)
    if isinstance(skip, str):
        skip = [skip]

    targets, skipped = [], []
    for qualname, layer in linear_layers(model):
        reason = why_not_convert(qualname, layer, name, skip)
        if reason:
            skipped.append((qualname, reason))
        else:
            targets.append((qualname, layer))

    places = {(layer.weight.device, layer.weight.dtype) for _, layer in targets}
    for device, dtype in sorted(places, key=str):
        info = precision_info(name, device, dtype)
        if not info.available:
            usable = [p for p in precision_names() if precision_info(p, device, dtype).available]
            raise BackendError(
                f"precision {name!r} is not available on {device}: {info.reason}; "
                f"available there: {', '.join(usable)}"
            )

    restore_precision(model)  # first, so that the earlier precision's weights are freed before new ones are made
    report = PrecisionReport(name, skipped=skipped)
    with torch.no_grad():
        for qualname, layer in targets:
            try:
                wrapper = wrap(layer, name)
            except BackendError:  # a registered precision failing on this layer: none half-converted
                restore_precision(model)
                raise
            model.set_submodule(qualname, wrapper)
            report.changed.append(qualname)
            report.bytes_before += layer.weight.nbytes
            report.bytes_after += wrapper.weight_bytes()
    return report


def linear_layers(module: nn.Module, prefix: str = ""):
    """(qualified name, nn.Linear) for every linear layer below `module`; one already converted is
    given as its original, under the wrapper's name. Every path is walked, so a layer shared under
    two names is converted under both rather than left behind under the second."""
    for name, child in module.named_children():
        qualname = prefix + name
        if isinstance(child, PrecisionLinear):
            yield qualname, child.original
        elif isinstance(child, nn.Linear):
            yield qualname, child
        else:
            yield from linear_layers(child, qualname + ".")


def why_not_convert(qualname: str, layer: nn.Linear, name: str, skip) -> str | None:
    for pattern in skip:
        if fnmatch.fnmatchcase(qualname, pattern):
            return f"matches skip pattern {pattern!r}"
    if layer.weight.device.type == "meta":
        # accelerate's offloading loads these weights in a hook on the layer, which a wrapper bypasses.
        return "its weights are offloaded (on the meta device)"
    if isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling the layer, so a
        # wrapper would be silently bypassed.
        return "nn.MultiheadAttention reads its out_proj weight directly"
    if name == "fp8" and (layer.in_features % 16 or layer.out_features % 16):
        # A CUDA requirement of _scaled_mm; applied on every device so a CPU run converts the same
        # layers a GPU run would.
        return f"fp8 needs in and out features divisible by 16, got in={layer.in_features}, out={layer.out_features}"
    return None


def restore_precision(model: nn.Module) -> list[str]:
    """Put every original nn.Linear back; returns the qualified names restored."""
    wrapped = [
        (qualname, m) for qualname, m in model.named_modules(remove_duplicate=False) if isinstance(m, PrecisionLinear)
    ]
    for qualname, wrapper in wrapped:
        model.set_submodule(qualname, wrapper.original)
    return [qualname for qualname, _ in wrapped]


def precision_of(model: nn.Module) -> str | None:
    """The precision applied to `model`, None if none (the first one found, should parts of it
    have been given different precisions one by one)."""
    return next((m.precision for m in model.modules() if isinstance(m, PrecisionLinear)), None)
