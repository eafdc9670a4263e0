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
    to the step times it buys.
  - batched classifier-free guidance (both passes as one batch of two) is the lane's default.
None of it changes the arithmetic beyond floating-point order: images match the plain path's
within tolerance.

Depends on torch, diffusers' Attention and the studio core; never on Gradio.
"""

from __future__ import annotations

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

    def news(self) -> str | None:
        """The compile failures not told yet; None if there are none."""
        untold, self.told = self.compile_errors[self.told:], len(self.compile_errors)
        return "; ".join(untold) or None


def enable_fast_path(pipeline, compile: bool = False, mode: str = COMPILE_MODE) -> FastPathReport:
    """Put a LatentDiffusionPipeline's denoiser and VAE on the fast path (in place; calling it
    again only adds what is new, e.g. compile=True). Returns, and keeps as
    pipeline.fast_path_report, what was done."""
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
    pipeline.sync_precision(pipeline.precision)
    if compile:
        for name, module in (("denoiser", pipeline.denoiser), ("vae decoder", pipeline.vae.decoder)):
            if name not in report.compiled:
                module.compile(mode=mode, dynamic=False)
                module._compiled_call_impl = _eager_on_failure(module, module._compiled_call_impl, name, report)
                report.compiled.append(name)
        report.compile_mode = mode
    pipeline.fast_path_report = report
    return report


def _eager_on_failure(module, compiled_call, name: str, report: FastPathReport):
    """The compiled call of `module`, which, if compiling or running the compiled code fails,
    records why, puts the module back to its eager call for good and runs that instead: a
    failing compiler costs the user speed, never the image. (nn.Module.compile keeps the
    compiled call in _compiled_call_impl; there is no public way to take it back.)"""

    def call(*args, **kwargs):
        try:
            with backends.for_compiled_code():
                out = compiled_call(*args, **kwargs)
        except Exception as error:  # any failure of the compiler; the eager module is still right
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            report.compile_errors.append(f"compiling the {name} failed ({text}); it runs uncompiled")
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)
        if report.compile_mode in CUDA_GRAPH_MODES:
            # a CUDA graph's outputs live in its static memory, which its next replay overwrites:
            # sequential CFG calls the denoiser twice per step, and needs the first answer kept
            out = out.clone() if isinstance(out, torch.Tensor) else type(out)(t.clone() for t in out)
        return out

    return call


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
