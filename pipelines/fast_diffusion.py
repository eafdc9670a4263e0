"""The diffusion lane's fast path: the same denoiser and VAE, laid out (and optionally compiled) for the GPU.

    img = LatentDiffusionPipeline.from_pretrained("fashion-dit")                   # CUDA: on by default
    img = LatentDiffusionPipeline.from_pretrained("fashion-dit", fast_path=False)  # as diffusers ships it
    report = enable_fast_path(img, compile=True)     # also torch.compile the denoiser and VAE decoder
    warm_up(img, height=512, width=512)              # compile now, and report how long it took

Stock diffusers spends most of a step launching kernels and transposing layouts (shared/ANCHORS.md:
6 % of matmul peak for SD-1.5's UNet). What changes, and why:
  - channels-last memory for the denoiser and the VAE: cuDNN's fastest tensor-core convolutions
    work in NHWC; with NCHW weights every convolution pays layout transposes around it.
  - fused QKV: each self-attention's q, k and v projections become one matmul (cross-attention:
    k and v), fused per `Attention` module so that the studio's processor, and with it the
    attention kernel `backends.use()` chose, stays in place. diffusers' model-level
    `fuse_qkv_projections()` would install its own FusedAttnProcessor2_0 and bypass the backends,
    and DiT has no such method. The separate projections are kept (for unfusing) but never read.
  - torch.compile, opt-in: inductor fuses the element-wise work (norms, activations, residuals)
    around the matmuls and convolutions. It compiles lazily, at the first call per input shape,
    and takes about a minute for SD-1.5's UNet (66 s in ANCHORS.md), so it is off unless asked
    for; `warm_up()` compiles up front and records the wall time in the report, to be quoted next
    to the step times it buys. compile="background" (the app's choice on the CPU, where the
    shipped models compile in 10-30 s) compiles each new shape in a thread while calls of that
    shape run eagerly. A module with forward hooks on (an unmerged LoRA adapter) runs eagerly.
  - batched classifier-free guidance (both passes as one batch of two) is the lane's default.
None of it changes the arithmetic beyond floating-point order: images match the plain path's
within tolerance.

Depends on torch, diffusers' Attention and the studio core; never on Gradio.
"""

from __future__ import annotations

import contextvars
import os
import threading
from dataclasses import dataclass, field
from time import perf_counter

import torch
from diffusers.models.attention_processor import Attention

from studio import backends

# autotuned kernels without inductor's own CUDA graphs, whose outputs the next call overwrites;
# "max-autotune" or "reduce-overhead" add those graphs (which of them wins is for the benchmark to say)
COMPILE_MODE = "max-autotune-no-cudagraphs"
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes whose compiled code replays CUDA graphs


@dataclass
class FastPathReport:
    channels_last: list[str] = field(default_factory=list)  # the models now in channels-last memory
    fused_attention: dict[str, int] = field(default_factory=dict)  # model -> Attention modules with fused projections
    compiled: list[str] = field(default_factory=list)  # the modules torch.compile wraps
    compile_mode: str | None = None
    compile_s: float | None = None  # wall time of warm_up(): with compile, mostly compiling; None until measured
    compile_errors: list[str] = field(default_factory=list)  # why compiled modules failed: they run eagerly now
    told: int = 0  # how many of them the user has been told about (once each, in an event's notice)
    background: bool = False  # compile="background": new input shapes compile in a thread
    compiled_shapes: dict[tuple, float] = field(default_factory=dict)  # background: (module, inputs) -> compile seconds
    compiling: set[tuple] = field(default_factory=set)  # background: the (module, inputs) being compiled now
    # held by a background compile while it runs the compiled modules, and by a run that attaches
    # an adapter's hooks: torch.compile does not guard on hooks, so hooks it traced would stay in
    # the graph for every later call, and hooks it missed would be skipped
    tracing: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # background compiles wait for this before they start (as FastDecoder.compile_after); None: at once
    compile_after: threading.Event | None = None

    def news(self) -> str | None:
        """The compile failures not told yet; None if there are none."""
        untold, self.told = self.compile_errors[self.told:], len(self.compile_errors)
        return "; ".join(untold) or None

    def status(self) -> str:
        """One line for the app's counters: what the fast path does, and where its compiles stand."""
        line = "fast path: channels-last, fused QKV"
        if self.compile_errors:
            return f"{line}; uncompiled: {self.compile_errors[-1]}"
        if not self.compiled:
            return line
        line += f"; {' and '.join(self.compiled)} compiled ({self.compile_mode})"
        if self.background:
            done = self.compiled_shapes.values()
            line += f": {len(done)} input shape(s) in {sum(done):.0f} s" if done else ""
            line += f"; {len(self.compiling)} compiling in the background (those calls run uncompiled)" if self.compiling else ""
        return line


def enable_fast_path(pipeline, compile: bool | str = False, mode: str = COMPILE_MODE) -> FastPathReport:
    """Put a LatentDiffusionPipeline's denoiser and VAE on the fast path (in place; calling it
    again only adds what is new, e.g. compile=True). Returns, and keeps as
    pipeline.fast_path_report, what was done. compile=True compiles each new input shape at its
    first call; compile="background" compiles it in a thread while calls of that shape run
    uncompiled (the app's choice on the CPU: changing the image size never waits for a compile)."""
    if compile not in (False, True, "background"):
        raise ValueError(f"compile must be True, False or 'background'; got {compile!r}")
    report = getattr(pipeline, "fast_path_report", None) or FastPathReport()
    for name, model in (("denoiser", pipeline.denoiser), ("vae", pipeline.vae)):
        model.to(memory_format=torch.channels_last)
        if name not in report.channels_last:
            report.channels_last.append(name)
        # fused layers are new nn.Linear modules: take the precision off first, so that putting it
        # back (below) converts them too
        backends.restore_precision(model)
        fused = fuse_qkv(model)
        if fused:
            report.fused_attention[name] = report.fused_attention.get(name, 0) + fused
    pipeline.unfuse_adapter_targets()  # an adapter loaded before this keeps its hooks' layers
    pipeline.sync_precision(pipeline.precision)
    if compile:
        for name, module in (("denoiser", pipeline.denoiser), ("vae decoder", pipeline.vae.decoder)):
            if name not in report.compiled:
                module.compile(mode=mode, dynamic=False)
                module._compiled_call_impl = _compiled_or_eager(module, module._compiled_call_impl, name, report)
                report.compiled.append(name)
        report.compile_mode = mode
        report.background = compile == "background"
    pipeline.fast_path_report = report
    return report


def _compiled_or_eager(module, compiled_call, name: str, report: FastPathReport):
    """The compiled call of `module`. If compiling or running the compiled code fails, it records
    why, puts the module back to its eager call for good and runs that instead: a failing compiler
    costs the user speed, never the image. (nn.Module.compile keeps the compiled call in
    _compiled_call_impl; there is no public way to take it back.) With report.background, a call
    with inputs of a new shape starts compiling them in a thread and runs eagerly meanwhile."""

    def run_compiled(*args, **kwargs):
        with backends.for_compiled_code():
            return compiled_call(*args, **kwargs)

    def fall_back(error: Exception):
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        report.compile_errors.append(f"compiling the {name} failed ({text}); it runs uncompiled")
        module._compiled_call_impl = None

    def compile_in_background(key, context, args, kwargs):
        if hasattr(os, "setpriority"):  # yield the CPU to the requests running eagerly meanwhile (as fast_decode)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        if report.compile_after is not None:
            report.compile_after.wait()
        started = perf_counter()
        try:
            with report.tracing, torch.no_grad():
                context.run(run_compiled, *args, **kwargs)  # the caller's context: its attention kernel
            report.compiled_shapes[key] = perf_counter() - started
        except Exception as error:  # as in call(): the module runs eagerly from now on
            fall_back(error)
        finally:
            report.compiling.discard(key)

    def call(*args, **kwargs):
        if any(m._forward_hooks for m in module.modules()):
            # an unmerged LoRA adapter: torch.compile does not guard on hooks (skip_nnmodule_hook_guards),
            # so compiled code would run without them, or keep them once traced; it runs eagerly
            return module._call_impl(*args, **kwargs)
        if report.background:
            # the kernel and the precision are in the key: under others the call would recompile
            key = (name, _input_shapes(args, kwargs), backends.current().attention, backends.precision_of(module))
            if key not in report.compiled_shapes:
                if key not in report.compiling:
                    report.compiling.add(key)
                    # the call's own tensors (copies could differ in strides, which the compile
                    # specialises on); what it computes from them is thrown away
                    threading.Thread(target=compile_in_background, daemon=True, name=f"compile {name}",
                                     args=(key, contextvars.copy_context(), args, kwargs)).start()
                return module._call_impl(*args, **kwargs)
        try:
            out = run_compiled(*args, **kwargs)
        except Exception as error:  # any failure of the compiler; the eager module is still right
            fall_back(error)
            return module._call_impl(*args, **kwargs)
        if report.compile_mode in CUDA_GRAPH_MODES:
            # a CUDA graph's outputs live in its static memory, which its next replay overwrites:
            # sequential CFG calls the denoiser twice per step, and needs the first answer kept
            out = out.clone() if isinstance(out, torch.Tensor) else type(out)(t.clone() for t in out)
        return out

    return call


def _input_shapes(args, kwargs) -> tuple:
    """What a static compile specialises on, roughly: each tensor's shape, strides, dtype and
    device, and the other arguments' values (flags such as return_dict)."""
    def describe(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), value.stride(), value.dtype, value.device
        return value if isinstance(value, (bool, str, type(None))) else type(value).__name__

    return tuple(map(describe, args)), tuple((k, describe(v)) for k, v in sorted(kwargs.items()))


def fuse_qkv(model: torch.nn.Module) -> int:
    """Fuse the projections of every diffusers Attention in `model` that is not fused yet; returns
    how many were. The studio's processor reads `to_qkv` / `to_kv` once `fused_projections` is set."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and not getattr(module, "fused_projections", False):
            module.fuse_projections()
            count += 1
    return count


def warm_up(pipeline, prompt: str = "", steps: int = 2, **kwargs) -> float:
    """Generate once and return the wall-clock seconds (also stored as the report's compile_s).
    With compile=True the first call per input shape compiles, so this is the compile time to
    quote; pass the size and guidance of the runs to be measured, as each new shape compiles anew."""
    synchronize = getattr(torch, pipeline.device.type).synchronize
    synchronize()
    started = perf_counter()
    pipeline(prompt, steps=steps, **kwargs)
    synchronize()
    seconds = perf_counter() - started
    if getattr(pipeline, "fast_path_report", None) is not None:
        pipeline.fast_path_report.compile_s = seconds
    return seconds
