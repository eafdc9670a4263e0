"""Anyone's attention kernel or matmul precision on the highway, checked before it runs.

    from studio import backends
    backends.register_attention("chunked", chunked_attention, description="...")  # fn(q, k, v, causal, mask, scale)
    backends.register_precision("int8-group", Int8GroupLinear, description="...", max_error="int8")  # convert(linear)
    backends.unregister("chunked")

A registered backend is listed, chosen, run and benchmarked exactly as a built-in: this module
puts it in ATTENTION_REGISTERED or PRECISION_REGISTERED, which the rest of the studio reads.

The contract of an attention kernel is the studio's own layout (attention.py): q [batch, heads,
q_len, head_dim], k and v [batch, kv_heads, kv_len, head_dim], causal aligned to the END of the
keys, mask boolean (True = attend) or additive, broadcastable to [batch, heads, q_len, kv_len];
it returns [batch, heads, q_len, head_dim] in q's dtype. A precision's `convert` takes one
nn.Linear, must leave it untouched, and returns a module computing it in the input's dtype.

Checked before it runs: the first time a registered backend is asked about a device and dtype
(listed, chosen or called), it runs on the battery of checks.py against the float64 reference,
the same cases the built-ins are tested on. One that fails is unavailable there, its reason
naming the case and the measured error; nothing falls back silently. A kernel declares what it
takes (causal, masks, gqa, cross, head_dims): undeclared cases are left out of its check and
refused per call with the reason, never run wrongly. Its exceptions and wrong outputs become a
BackendError naming it, so the studio serves on with the other backends.

Installed packages declare plugins as entry points of group GROUP, each a function that is
called with no arguments and registers its backends; they are loaded at import of
studio.backends. One that fails is recorded with its error (registry.SOURCES), not raised.

Depends on torch, registry, checks, attention and precision; never on a pipeline, the UI or a
model library.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.metadata
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checks
from .attention import DESCRIPTIONS as ATTENTION_DESCRIPTIONS
from .attention import REGISTERED as ATTENTION_REGISTERED
from .attention import run_kernel
from .precision import PRECISIONS, PrecisionLinear
from .precision import REGISTERED as PRECISION_REGISTERED
from .registry import SOURCES, BackendError, BackendInfo, PluginSource, dtype_name, error_line

log = logging.getLogger(__name__)

GROUP = "generation_studio.backends"
NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")  # what fits a CLI flag and a dropdown menu
ATTENTION_CONTRACT = "fn(q, k, v, causal, mask, scale) -> out"
PRECISION_CONTRACT = "convert(linear: nn.Linear) -> nn.Module"

Requirement = Callable[[torch.device, torch.dtype], "str | None"]


# ---------------------------------------------------------------------------------------------
# What both kinds share: declared devices and dtypes, a requirement, the check, cached per place.


@dataclass(eq=False)
class Registered:
    name: str
    description: str
    origin: str  # who registered it, for every message about it
    devices: tuple[str, ...] | None  # device types it runs on; None: any
    dtypes: tuple[torch.dtype, ...] | None  # input dtypes it takes; None: any floating dtype
    requirement: Requirement | None  # why it cannot run on (device, dtype), e.g. a library missing; None: it can
    _reasons: dict = field(default_factory=dict, repr=False)  # (device, dtype) -> reason it cannot run, or None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    kind = ""

    def info(self, device: torch.device, dtype: torch.dtype) -> BackendInfo:
        device = torch.device(device)
        with self._lock:  # two threads asking at once run the check once
            if (device, dtype) not in self._reasons:
                self._reasons[(device, dtype)] = self._unavailable_reason(device, dtype)
        reason = self._reasons[(device, dtype)]
        return BackendInfo(self.name, self.kind, reason is None, reason, f"{self.description} [{self.origin}]")

    def _unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if checks.device_missing(device):
            return checks.device_missing(device)
        if self.devices is not None and device.type not in self.devices:
            return f"declared for {' and '.join(self.devices)} only, not {device.type} ({self.origin})"
        if self.dtypes is not None and dtype not in self.dtypes:
            return f"declared for {' and '.join(map(dtype_name, self.dtypes))} only, not {dtype_name(dtype)} ({self.origin})"
        if self.requirement is not None:
            try:
                reason = self.requirement(device, dtype)
            except Exception as error:
                return f"its requirement check raised {error_line(error)}"
            if reason is not None:
                return str(reason)
        try:
            self._check(device, dtype)
        except Exception as error:  # a CheckFailure naming the case, or the battery's inputs not made on this device
            why = error if isinstance(error, BackendError) else error_line(error)
            return f"failed the check against the float64 reference on {device.type} {dtype_name(dtype)}: {why}"
        return None

    def _check(self, device: torch.device, dtype: torch.dtype) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Attention kernels


@dataclass(eq=False)
class AttentionPlugin(Registered):
    fn: Callable = None
    causal: bool = True  # takes causal=True (bottom-right aligned)
    masks: bool = True  # takes boolean and additive masks
    gqa: bool = True  # takes fewer K/V heads than query heads
    cross: bool = True  # takes q_len != kv_len: cross-attention, and decoding over a KV cache
    head_dims: tuple[int, ...] | None = None  # the head sizes it takes; None: any
    auto: bool = False  # auto may choose it (before the built-ins) where it takes the inputs

    kind = "attention"

    def refusal(self, q, k, v, causal, mask) -> str | None:
        missing, flags = [], []
        if causal and not self.causal:
            missing.append("causal attention")
            flags.append("causal=False")
        if mask is not None and not self.masks:
            missing.append("masks")
            flags.append("masks=False")
        if q.shape[1] != k.shape[1] and not self.gqa:
            missing.append(f"grouped-query attention ({q.shape[1]} heads over {k.shape[1]} K/V heads)")
            flags.append("gqa=False")
        if q.shape[-2] != k.shape[-2] and not self.cross:
            missing.append(f"q_len {q.shape[-2]} != kv_len {k.shape[-2]} (cross-attention, a KV cache)")
            flags.append("cross=False")
        if self.head_dims is not None and q.shape[-1] not in self.head_dims:
            missing.append(f"head_dim {q.shape[-1]}")
            flags.append(f"head_dims={self.head_dims}")
        if not missing:
            return None
        return f"it was registered without {' or '.join(missing)} ({', '.join(flags)}, by {self.origin})"

    def __call__(self, q, k, v, causal, mask, scale) -> torch.Tensor:
        try:
            out = self.fn(q, k, v, causal, mask, scale)
        except Exception as error:
            raise BackendError(
                f"attention backend {self.name!r} ({self.origin}) raised {error_line(error)}; choose another backend"
            ) from error
        expected = (*q.shape[:-1], v.shape[-1])
        right = isinstance(out, torch.Tensor) and tuple(out.shape) == expected and out.dtype == q.dtype
        if not right or out.device != q.device:
            raise BackendError(
                f"attention backend {self.name!r} ({self.origin}) returned {checks.describe(out)}; the contract is a "
                f"{dtype_name(q.dtype)} tensor of shape {expected} on {q.device} ([batch, heads, q_len, head_dim])"
            )
        return out

    def _check(self, device, dtype) -> None:
        cases = checks.cases_for(self.head_dims, causal=self.causal, masks=self.masks, gqa=self.gqa, cross=self.cross)
        checks.check_attention(lambda *inputs: run_kernel(self.name, *inputs), device, dtype, cases)


def register_attention(
    name: str,
    fn: Callable,
    *,
    description: str,
    devices: Iterable[str] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    causal: bool = True,
    masks: bool = True,
    gqa: bool = True,
    cross: bool = True,
    head_dims: Iterable[int] | None = None,
    auto: bool = False,
    requirement: Requirement | None = None,
) -> None:
    """Make `fn(q, k, v, causal, mask, scale) -> out` the attention backend `name`, everywhere the
    built-ins are. Declare what it does not take (causal, masks, gqa, cross = False; head_dims the
    sizes it takes), the device types and dtypes it runs on, and `requirement(device, dtype)`
    saying why it cannot run (a library missing); `auto=True` lets auto choose it first, where it
    takes the inputs and passed the check. Raises BackendError naming the problem: a taken name,
    a function that cannot be called so, a bad declaration."""
    origin = _origin(fn)
    _check_name(name, origin)
    _check_signature(fn, 6, ATTENTION_CONTRACT, name, origin)
    head_dims = None if head_dims is None else tuple(head_dims)
    if head_dims is not None and (not head_dims or not all(isinstance(d, int) and d > 0 for d in head_dims)):
        raise BackendError(f"{name!r} ({origin}): head_dims must be positive integers, or None for any; got {head_dims}")
    plugin = AttentionPlugin(
        name, _description(description, name, origin), origin, _devices(devices, name, origin),
        _dtypes(dtypes, name, origin), requirement, fn=fn, causal=bool(causal), masks=bool(masks), gqa=bool(gqa),
        cross=bool(cross), head_dims=head_dims, auto=bool(auto),
    )
    ATTENTION_REGISTERED[name] = plugin
    _registered(name)


# ---------------------------------------------------------------------------------------------
# Matmul precisions


class ConvertedLinear(PrecisionLinear):
    """A registered precision's module standing in for one nn.Linear, the original kept whole for
    restoring. The module's own weights become non-persistent buffers, as the built-ins' are, so
    that the model's parameters stay exactly its originals (tied weights, counts, restoring)."""

    def __init__(self, original: nn.Linear, name: str, converted: nn.Module, origin: str):
        super().__init__(original)
        self.precision, self.origin = name, origin
        originals = {id(p) for p in original.parameters()}
        for module in converted.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) not in originals:
                    del module._parameters[key]
                    module.register_buffer(key, param.detach(), persistent=False)
        self.converted = converted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.converted(x)
        except Exception as error:
            raise BackendError(f"precision {self.precision!r} ({self.origin}) raised {error_line(error)}") from error
        expected = (*x.shape[:-1], self.out_features)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected or out.dtype != x.dtype:
            raise BackendError(
                f"precision {self.precision!r} ({self.origin}) returned {checks.describe(out)}; the contract is the "
                f"input's dtype ({dtype_name(x.dtype)}) and shape {expected}"
            )
        return out

    def weight_bytes(self) -> int:
        tensors = {id(t): t for t in (*self.converted.parameters(), *self.converted.buffers())}
        return sum(t.nbytes for t in tensors.values())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, precision={self.precision}"


@dataclass(eq=False)
class PrecisionPlugin(Registered):
    convert: Callable = None
    max_error: float = 0.0  # relative error allowed on the check's layers, before the dtype's own rounding

    kind = "precision"

    def wrap(self, layer: nn.Linear) -> ConvertedLinear:
        try:
            converted = self.convert(layer)
        except Exception as error:
            raise BackendError(
                f"precision {self.name!r} ({self.origin}) failed to convert a {layer.in_features} -> "
                f"{layer.out_features} layer: {error_line(error)}"
            ) from error
        if not isinstance(converted, nn.Module):
            raise BackendError(
                f"precision {self.name!r} ({self.origin}) returned {type(converted).__name__}; "
                f"the contract is {PRECISION_CONTRACT}"
            )
        return ConvertedLinear(layer, self.name, converted, self.origin)

    def _check(self, device, dtype) -> None:
        checks.check_precision(self.wrap, device, dtype, self.max_error)


def register_precision(
    name: str,
    convert: Callable,
    *,
    description: str,
    devices: Iterable[str] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    max_error: float | str = "bf16",
    requirement: Requirement | None = None,
) -> None:
    """Make `convert(linear: nn.Linear) -> nn.Module` the matmul precision `name`, everywhere the
    built-ins are. `max_error` is the relative error it claims on a random layer (the check's),
    a number or the name of a built-in format whose bound it keeps to ("fp16", "bf16", "int8",
    "fp8"; default bf16's). Devices, dtypes and `requirement` as for register_attention. Raises
    BackendError naming the problem."""
    origin = _origin(convert)
    _check_name(name, origin)
    _check_signature(convert, 1, PRECISION_CONTRACT, name, origin)
    if isinstance(max_error, str):
        if max_error not in checks.ERROR_BOUNDS:
            raise BackendError(
                f"{name!r} ({origin}): max_error {max_error!r} names no built-in format; "
                f"use one of {', '.join(checks.ERROR_BOUNDS)} or a number"
            )
        max_error = checks.ERROR_BOUNDS[max_error][1]
    if not isinstance(max_error, (int, float)) or not 0 < max_error < 1:
        raise BackendError(f"{name!r} ({origin}): max_error must be a relative error between 0 and 1; got {max_error!r}")
    plugin = PrecisionPlugin(
        name, _description(description, name, origin), origin, _devices(devices, name, origin),
        _dtypes(dtypes, name, origin), requirement, convert=convert, max_error=float(max_error),
    )
    PRECISION_REGISTERED[name] = plugin
    _registered(name)


# ---------------------------------------------------------------------------------------------
# Names


def unregister(name: str) -> None:
    """Remove the registered backend `name` (models already converted to it keep running it)."""
    if name in ATTENTION_REGISTERED:
        del ATTENTION_REGISTERED[name]
    elif name in PRECISION_REGISTERED:
        del PRECISION_REGISTERED[name]
    elif name in ATTENTION_DESCRIPTIONS or name in PRECISIONS:
        raise BackendError(f"{name!r} is a built-in backend; only registered ones can be unregistered")
    else:
        raised = [*ATTENTION_REGISTERED, *PRECISION_REGISTERED]
        raise BackendError(f"no registered backend is named {name!r}; registered: {', '.join(raised) or 'none'}")


def registered(name: str) -> Registered | None:
    """The registration of backend `name`, None for a built-in or an unknown name."""
    return ATTENTION_REGISTERED.get(name) or PRECISION_REGISTERED.get(name)


def _check_name(name, origin: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise BackendError(
            f"a backend's name is lowercase letters, digits, '.', '_' and '-', starting with a letter or digit; "
            f"got {name!r} ({origin})"
        )
    if name in ATTENTION_DESCRIPTIONS or name in PRECISIONS:
        kind = "attention kernel" if name in ATTENTION_DESCRIPTIONS else "precision"
        raise BackendError(f"{name!r} is the name of a built-in {kind} and cannot be taken ({origin}); choose another")
    taken = registered(name)
    if taken is not None:
        raise BackendError(
            f"{name!r} is already registered, as {taken.kind}, by {taken.origin} ({origin}); choose another name, "
            f"or backends.unregister({name!r}) first"
        )


def _check_signature(fn, arity: int, contract: str, name: str, origin: str) -> None:
    if not callable(fn):
        raise BackendError(f"{name!r} ({origin}): {type(fn).__name__} is not callable; the contract is {contract}")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the check will tell whether it can be called so
    try:
        signature.bind(*range(arity))
    except TypeError as error:
        raise BackendError(
            f"{name!r} ({origin}): {getattr(fn, '__qualname__', fn)}{signature} cannot be called as {contract} ({error})"
        ) from None


def _description(description, name: str, origin: str) -> str:
    if not isinstance(description, str) or not description.strip():
        raise BackendError(f"{name!r} ({origin}): a description (one line: what it is and does) is required")
    return description.strip()


def _devices(devices, name: str, origin: str) -> tuple[str, ...] | None:
    if devices is None:
        return None
    devices = (devices,) if isinstance(devices, str) else tuple(devices)
    try:
        return tuple(torch.device(d).type for d in devices)
    except (RuntimeError, TypeError) as error:
        raise BackendError(f"{name!r} ({origin}): devices must be device types such as 'cuda' or 'cpu' ({error})") from None


def _dtypes(dtypes, name: str, origin: str) -> tuple[torch.dtype, ...] | None:
    if dtypes is None:
        return None
    dtypes = tuple(dtypes)
    if not dtypes or not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        raise BackendError(f"{name!r} ({origin}): dtypes must be floating torch dtypes, or None for any; got {dtypes}")
    return dtypes


# ---------------------------------------------------------------------------------------------
# Discovery: installed packages' entry points

# While an entry point's function runs: (its label, the names it registered so far)
_loading: contextvars.ContextVar[tuple[str, list[str]] | None] = contextvars.ContextVar("studio_plugin", default=None)


def _origin(fn) -> str:
    loading = _loading.get()
    if loading is not None:
        return loading[0]
    return f"module {getattr(fn, '__module__', None) or '(unknown)'}"


def _registered(name: str) -> None:
    loading = _loading.get()
    if loading is not None:
        loading[1].append(name)


def load_entry_points(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> list[PluginSource]:
    """Load the installed plugins (default: every entry point of GROUP) not loaded yet: each one's
    function is called and registers its backends. A plugin is registered whole or not at all;
    one that fails is recorded with its error in registry.SOURCES, not raised, so the studio
    serves on. Returns the sources loaded now."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=GROUP)
    loaded = []
    for entry_point in entry_points:
        if any(s.name == entry_point.name and s.value == entry_point.value for s in SOURCES):
            continue
        dist = getattr(entry_point, "dist", None)
        distribution = f"{dist.name} {dist.version}" if dist is not None else None
        label = f"plugin {entry_point.name!r}" + (f" from {distribution}" if distribution else f" ({entry_point.value})")
        names: list[str] = []
        token = _loading.set((label, names))
        try:
            register = entry_point.load()
            if not callable(register):
                raise TypeError(f"{entry_point.value} is a {type(register).__name__}, not a function to call")
            register()
            error = None
        except Exception as exc:  # an import error, or anything its code raises: reported, never fatal
            error = error_line(exc)
            for name in names:
                with contextlib.suppress(BackendError):
                    unregister(name)
            names = []
            log.info("plugin %s failed to load: %s", label, error)
        finally:
            _loading.reset(token)
        source = PluginSource(entry_point.name, entry_point.value, distribution, tuple(names), error)
        SOURCES.append(source)
        loaded.append(source)
    return loaded


def installed_plugins() -> list[PluginSource]:
    """Every installed plugin loaded so far: what it registered, or why it failed."""
    return list(SOURCES)
