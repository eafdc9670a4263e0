"""The studio's attention backends inside any transformers model that uses AttentionInterface.

    from studio.integrations.transformers import use_studio_attention
    use_studio_attention(model)              # once; then backends.use(attention=...) switches

Two registrations are needed: the attention function, and the mask function that builds the
mask it receives. Without the second, transformers builds no mask for an unknown implementation
and padding is silently ignored. We register transformers' own SDPA mask: boolean (True =
attend), or None when a plain causal flag suffices, which keeps the flash kernels usable.

Depends on transformers and studio.backends.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from studio import backends
from studio.backends import BackendError

NAME = "studio"


def studio_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers calls this with q [batch, heads, q_len, dim], k/v [batch, kv_heads, kv_len, dim]
    and wants back ([batch, q_len, heads, dim], weights or None)."""
    if kwargs.get("softcap") is not None:
        raise BackendError("this model soft-caps its attention scores, which the studio's backends do not implement")
    if dropout and module.training:
        raise BackendError("the studio's attention backends are for inference; put the model in eval() mode")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    # transformers hands over no mask when a causal flag is enough (see sdpa_mask)
    causal = bool(is_causal and attention_mask is None and q_len > 1)
    if causal and key.shape[2] > q_len:
        # Prefill into an empty static cache: the keys past the prompt are empty slots, and the
        # skipped mask relied on top-left alignment. Our causal is bottom-right, so drop the slots.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        # T5-style relative position bias: an additive term on the scores, folded into the mask
        if attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = position_bias.masked_fill(~attention_mask, float("-inf"))
        else:
            attention_mask = attention_mask + position_bias
    if backends.current().attention == "eager":
        out, weights = backends.attention(
            query, key, value, causal=causal, mask=attention_mask, scale=scaling, return_weights=True
        )
    else:
        out, weights = backends.attention(query, key, value, causal=causal, mask=attention_mask, scale=scaling), None
    return out.transpose(1, 2).contiguous(), weights


AttentionInterface.register(NAME, studio_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_studio_attention(model) -> None:
    """Route every attention of `model` (and its sub-models) through `backends.attention`."""
    if not model._can_set_attn_implementation():
        raise BackendError(
            f"{type(model).__name__} does not use transformers' AttentionInterface, "
            "so the studio's attention backends cannot be plugged into it"
        )
    model.set_attn_implementation(NAME)
