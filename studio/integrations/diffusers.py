"""The studio's attention backends inside diffusers models: UNet2DConditionModel, PixArt- and
DiT-style transformers, and the VAE's mid-block attention.

    from studio.integrations.diffusers import use_studio_attention
    use_studio_attention(unet)               # once; then backends.use(attention=...) switches

We set an attention processor on every `Attention` module ourselves. `set_attn_processor` exists
only on models with diffusers' AttentionMixin (DiT has none), and diffusers' newer
`set_attention_backend` silently does nothing for these classic models.

Depends on diffusers and studio.backends.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from studio import backends
from studio.backends import BackendError


class StudioAttnProcessor:
    """diffusers' AttnProcessor2_0 (and its fused-QKV twin) with the SDPA call replaced by
    `backends.attention`, so the kernel is whatever `backends.use()` chose."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        # the VAE's attention sees feature maps: [batch, channels, h, w] -> [batch, h*w, channels]
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            # an additive mask repeated per head, as [batch, heads, q_len or 1, kv_len]
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        cross = encoder_hidden_states is not None
        if cross and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context = encoder_hidden_states if cross else hidden_states
        if getattr(attn, "fused_projections", False) and not cross:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)  # one matmul instead of three
        elif getattr(attn, "fused_projections", False):
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = backends.attention(query, key, value, mask=attention_mask, scale=attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)  # output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout (identity in eval)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_studio_attention(model: torch.nn.Module) -> int:
    """Give every diffusers `Attention` in `model` the studio's processor; returns how many."""
    processor = StudioAttnProcessor()
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
            count += 1
    if count == 0:
        raise BackendError(
            f"{type(model).__name__} has no diffusers Attention modules, so the studio's backends cannot be plugged in"
        )
    return count
