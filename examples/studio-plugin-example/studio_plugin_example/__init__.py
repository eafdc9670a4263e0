"""An example Generation Studio plugin: chunked-query attention and per-group int8 matmuls.

The studio calls `register()` (the entry point declared in pyproject.toml) when studio.backends
is imported; both backends are then checked against its float64 reference before their first
run on each device and dtype, and appear in `studio backends`, the app's menus and `studio bench`.

Depends on torch and studio.backends only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 32  # queries per block: the score matrix held at once is CHUNK x kv_len
GROUP = 32  # input features sharing one int8 scale


def chunked_attention(q, k, v, causal, mask, scale, chunk: int = CHUNK):
    """Attention one block of queries at a time, in the studio's layout: q [batch, heads, q_len,
    head_dim], k and v [batch, kv_heads, kv_len, head_dim], causal aligned to the end of the keys,
    mask boolean (True = attend) or additive. Scores and softmax in float32."""
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # grouped-query attention without copying K and V: the `group` query heads of each K/V head
    # side by side, [batch, kv_heads, group, q_len, head_dim] against [batch, kv_heads, 1, kv_len, head_dim]
    q = q.reshape(batch, kv_heads, group, q_len, head_dim)
    k, v = k[:, :, None].float(), v[:, :, None].float()
    if mask is not None:
        mask = mask.expand(batch, heads, q_len, kv_len)
    out = torch.empty(batch, kv_heads, group, q_len, v.shape[-1], dtype=q.dtype, device=q.device)
    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        scores = (q[..., start:stop, :].float() @ k.transpose(-1, -2)) * scale  # [.., chunk, kv_len]
        if mask is not None:
            block = mask[..., start:stop, :].reshape(batch, kv_heads, group, stop - start, kv_len)
            scores = scores.masked_fill(~block, -math.inf) if block.dtype == torch.bool else scores + block.float()
        if causal:  # query i sees keys 0 .. kv_len - q_len + i
            rows = torch.arange(start, stop, device=q.device)[:, None] + (kv_len - q_len)
            scores = scores.masked_fill(torch.arange(kv_len, device=q.device) > rows, -math.inf)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row that sees no key: zeros, not NaN
        out[..., start:stop, :] = (weights @ v).to(q.dtype)
    return out.reshape(batch, heads, q_len, -1)


class Int8GroupLinear(nn.Module):
    """One nn.Linear with its weight in int8, one float32 scale per GROUP input features of each
    output row (symmetric: the group's largest |w| maps to 127). The original is left untouched."""

    def __init__(self, linear: nn.Linear, group: int = GROUP):
        super().__init__()
        weight = linear.weight.detach().float()
        self.out_features, self.in_features = weight.shape
        self.group = math.gcd(self.in_features, group)  # a width GROUP does not divide gets smaller groups
        groups = weight.reshape(self.out_features, -1, self.group)
        scales = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", torch.round(groups / scales).to(torch.int8))
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight_int8.float() * self.scales).reshape(self.out_features, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight.to(x.dtype), bias)


def register() -> None:
    """The entry point: register both backends with the studio."""
    from studio import backends

    backends.register_attention(
        "chunked", chunked_attention,
        description=f"attention {CHUNK} queries at a time in plain PyTorch: a score matrix of {CHUNK} x kv_len at most",
    )
    backends.register_precision(
        "int8-group", Int8GroupLinear,
        description=f"weight-only int8, one scale per {GROUP} input features of a row, dequantized per call",
        max_error="int8",
    )
