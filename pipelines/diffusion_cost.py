"""The diffusion lane's accounting: what each model call computed (FLOPs) and moved (bytes).

    meter = CostMeter(pipeline.flops_cache, pipeline.weight_bytes)
    out = meter.run("denoiser", denoiser, latents, timestep=t, ...)   # counted, then called
    cost = meter.take()          # the FLOPs, bytes and calls since the last take(): one step's

FLOPs are counted by torch's FlopCounterMode the first time a component meets a set of input
shapes, then reused: counting costs time, and the count depends on nothing else. The counted run
is a separate one whose output is dropped, eager and with SDPA attention: torch.compile skips for
good a frame it first meets under the counter's dispatch mode (so counting the real call would
leave a compiled model uncompiled), and FlexAttention or a plugin's kernel may not run under it
at all. Every kernel computes the same attention arithmetic, so SDPA's count is theirs too.
Bytes are an estimate of the traffic to device memory: the component's weights, read once
per call, plus the tensors in and out. Activations that spill out of the caches are not counted,
so it is a lower bound; it is the weight bytes that make a batch of two cheaper than two calls.

Depends on torch, diffusers' Attention (to know which projections fused layers no longer read)
and the studio core; never on a pipeline or Gradio.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_processor import Attention

from studio import backends
from studio.backends.precision import PrecisionLinear
from studio.cost import tensor_bytes
from studio.profiling import count_flops

@dataclass
class StepCost:
    flops: int = 0
    bytes: int = 0
    calls: Counter = field(default_factory=Counter)  # component -> calls made
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # component -> first input's shape


class CostMeter:
    """Counts one run's model calls; take() hands over what was counted since the last take()."""

    def __init__(self, flops_cache: dict, weight_bytes: dict[str, int]):
        self.flops_cache = flops_cache  # shared by a pipeline's runs: (component, kernel, shapes) -> FLOPs
        self.weight_bytes = weight_bytes
        self.cost = StepCost()

    def run(self, component: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), counted as a call of `component`."""
        key = (component, tensor_shapes((args, kwargs)))
        if key not in self.flops_cache:
            with torch.compiler.set_stance("force_eager"), backends.use(attention="sdpa"):
                _, self.flops_cache[key] = count_flops(fn, *args, **kwargs)
        output = fn(*args, **kwargs)
        self.cost.flops += self.flops_cache[key]
        self.cost.bytes += self.weight_bytes[component] + tensor_bytes((args, kwargs)) + tensor_bytes(output)
        self.cost.calls[component] += 1
        if args and isinstance(args[0], torch.Tensor):
            self.cost.shapes.setdefault(component, tuple(args[0].shape))
        return output

    def take(self) -> StepCost:
        cost, self.cost = self.cost, StepCost()
        return cost


def component_weight_bytes(text_encoder, denoiser, vae) -> dict[str, int]:
    """The bytes of weights one call of each counted component reads."""
    return {
        "text_encoder": weight_bytes(text_encoder),
        "denoiser": weight_bytes(denoiser),
        "vae_encoder": weight_bytes(vae.encoder, getattr(vae, "quant_conv", None)),
        "vae_decoder": weight_bytes(vae.decoder, getattr(vae, "post_quant_conv", None)),
    }


def weight_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of weights one forward pass through `modules` (None: absent) reads: every parameter
    once; a layer converted by backends.apply_precision reads its converted weights, not the
    original kept for restoring; projections replaced by fused ones (the fast path) are not read."""
    total = 0
    for module in (m for m in modules if m is not None):
        unread = unread_projections(module)
        converted = [m for m in module.modules() if isinstance(m, PrecisionLinear) and m not in unread]
        kept = {id(m.original.weight) for m in converted} | {id(p) for m in unread for p in m.parameters()}
        total += sum(p.nbytes for p in module.parameters() if id(p) not in kept)
        total += sum(m.weight_bytes() for m in converted)
    return total


def unread_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The separate projections that fused attention layers no longer call: their weights take
    memory but are not read by a forward pass."""
    unread = []
    for module in model.modules():
        if isinstance(module, Attention) and getattr(module, "fused_projections", False):
            self_attention = getattr(module, "to_qkv", None) is not None
            unread += [module.to_q, module.to_k, module.to_v] if self_attention else [module.to_k, module.to_v]
    return unread


def tensor_shapes(value):
    """A hashable summary (shape and dtype of every tensor) of nested arguments."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return tuple((name, tensor_shapes(v)) for name, v in value.items())
    if isinstance(value, (tuple, list)):
        return tuple(tensor_shapes(v) for v in value)
    return None
