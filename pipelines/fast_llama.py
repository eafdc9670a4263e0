"""The LLM fast path's model: a Llama-family decoder laid out for decoding one token at a time,
and the static KV cache it writes in place.

    model = FastLlama(transformers_model)          # shares the model's weights; q/k/v and gate/up fused
    cache = StaticKVCache(layers, batch, kv_heads, max_len, head_dim, dtype, device)
    logits = model.prefill_logits(prompt_ids, positions, cache, mask)
    logits = model.decode_logits(token_ids, positions, input_pos, cache)

Why each choice is made is told in fast_decode.py, which drives it. Depends on torch and the
studio's backends (prefill attention) only; never on a pipeline or transformers' model code.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from studio import backends

MIN_CACHE_LENGTH = 256


# ---------------------------------------------------------------------------------------------
# The cache


class StaticKVCache:
    """K and V of every layer, [batch, kv_heads, max_len, head_dim], allocated once and written in
    place at `input_pos`, so a captured graph always finds them at the same addresses.

    `valid` [batch, max_len] marks the slots that hold a real token: not yet written slots and
    left padding are False, and attention is masked with it. `filled` counts the slots written,
    on the host (the device's own count is the decode step's input_pos)."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.filled = 0

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value tensors: all of them, from the start."""
        return sum(t.nbytes for t in self.keys + self.values)


def cache_length(needed: int, context: int | None) -> int:
    """Slots for a request: a power of two >= needed (and >= MIN_CACHE_LENGTH), within the context.
    Each distinct length is a new shape to compile and capture; powers of two keep them few."""
    length = max(MIN_CACHE_LENGTH, 1 << (needed - 1).bit_length())
    return min(length, context) if context is not None else length


# ---------------------------------------------------------------------------------------------
# The model, laid out for decoding


def _in_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | nn.Parameter:
    """`tensor` itself where it already has `dtype` (None: keep it), else a copy in `dtype`."""
    if dtype is None or tensor.dtype == dtype:
        return tensor
    return nn.Parameter(tensor.detach().to(dtype), requires_grad=False)


def _shared_linear(layer, dtype: torch.dtype | None = None) -> nn.Linear:
    """An nn.Linear holding `layer`'s own weight and bias tensors (no copy, unless `dtype` asks for
    another). `layer` may be wrapped by backends.apply_precision; its .weight is then the original's."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = _in_dtype(layer.weight, dtype)
    if layer.bias is not None:
        linear.bias = _in_dtype(layer.bias, dtype)
    return linear


def _fused_linear(*layers, dtype: torch.dtype | None = None) -> nn.Linear:
    """One nn.Linear whose output rows are those of `layers`, stacked: one matmul reads the input
    once and launches once. A copy of the weights (in `dtype`, if given), built once."""
    with torch.no_grad():
        weight = torch.cat([layer.weight.to(dtype or layer.weight.dtype) for layer in layers])
        biases = [layer.bias for layer in layers]
        bias = torch.cat([b.to(weight.dtype) for b in biases]) if all(b is not None for b in biases) else None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _module_in_dtype(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """`module` itself, or a copy in `dtype` (a norm's weight must match the activations' dtype)."""
    if dtype is None or all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of dimensions (i, i + head_dim/2) by each position's angles, as Llama does."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def prompt_attention(q, k_cache, v_cache, *, length, mask, scale):
    """Prefill: the prompt's queries over the slots it filled (the rest of the cache is empty),
    causal, through the studio's backends: the kernel `backends.use()` chose, by default the
    fastest that runs here (cuDNN or flash through SDPA on a GPU)."""
    k, v = k_cache[:, :, :length], v_cache[:, :, :length]
    return backends.attention(q, k, v, causal=True, mask=mask, scale=scale)


def cached_attention(q, k_cache, v_cache, *, valid, scale):
    """Decode: one query per sequence over every slot of the static cache, masked to the slots
    holding a token. The shapes never change, so the step can be captured as a graph.

    Written out rather than through SDPA: grouped-query attention with a mask sends SDPA to
    kernels that first copy K and V once per query head, and at one query per head the two
    matmuls below (each K/V head against its group of query heads, side by side) read the cache
    exactly once."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = (grouped @ k_cache.transpose(-1, -2)).float() * scale  # [batch, kv_heads, group, max_len]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # softmax in fp32, as the backends do: bf16's 8 bits of mantissa are too few over many keys
    weights = torch.softmax(scores, dim=-1).to(q.dtype)
    return (weights @ v_cache).reshape(batch, heads, 1, head_dim)


class FastBlock(nn.Module):
    """One decoder layer: norm -> fused QKV -> RoPE -> write K/V into the cache -> attention ->
    output projection, then norm -> fused gate/up -> activation -> down projection."""

    def __init__(self, layer, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype | None = None):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.wqkv = _fused_linear(attn.q_proj, attn.k_proj, attn.v_proj, dtype=dtype)
        self.wo = _shared_linear(attn.o_proj, dtype)
        self.w13 = _fused_linear(mlp.gate_proj, mlp.up_proj, dtype=dtype)
        self.w2 = _shared_linear(mlp.down_proj, dtype)
        # the model's own norm and activation modules: the same arithmetic, bit for bit
        self.attention_norm = _module_in_dtype(layer.input_layernorm, dtype)
        self.mlp_norm = _module_in_dtype(layer.post_attention_layernorm, dtype)
        self.act = mlp.act_fn
        self.split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        self.head_dim = head_dim

    def forward(self, x, rope, k_cache, v_cache, slots, attend):
        batch, length, _ = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).split(self.split, dim=-1)
        q = q.view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        out = attend(q, k_cache, v_cache)
        x = x + self.wo(out.transpose(1, 2).reshape(batch, length, -1))
        gate, up = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w2(self.act(gate) * up)


class FastLlama(nn.Module):
    """A LlamaForCausalLM or Qwen2ForCausalLM's weights in decoding layout. Embedding, norms and
    lm_head are the model's own tensors; q/k/v and gate/up are fused copies (about half of a
    small model's weights again, in memory: the price of 4 matmuls per block instead of 7).

    dtype: lay the weights out in this dtype instead of the model's (bf16 on a CPU that
    multiplies it in hardware): then every weight is a copy, made once, and the activations and
    the KV cache follow that dtype too."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        super().__init__()
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.scale = self.head_dim**-0.5
        self.embed_tokens = _module_in_dtype(inner.embed_tokens, dtype)
        self.layers = nn.ModuleList(
            FastBlock(layer, self.heads, self.kv_heads, self.head_dim, dtype) for layer in inner.layers
        )
        self.norm = _module_in_dtype(inner.norm, dtype)
        head = model.get_output_embeddings()
        if dtype is not None and head.weight is inner.embed_tokens.weight:  # tied: one copy serves both
            self.lm_head = nn.Linear(head.in_features, head.out_features, bias=False, device="meta")
            self.lm_head.weight = self.embed_tokens.weight
        else:
            self.lm_head = _shared_linear(head, dtype)
        self.vocab = self.lm_head.out_features
        # the rotary frequencies as transformers computed them, rope scaling (Llama 3's) included
        self.register_buffer("inv_freq", inner.rotary_emb.inv_freq, persistent=False)
        self.rope_scaling = inner.rotary_emb.attention_scaling

    def rope_tables(self, positions, dtype):
        """cos and sin [batch, 1, len, head_dim] of each position's angles, as transformers' rotary
        embedding computes them (fp32 angles, then the model's dtype)."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scaling).to(dtype)
        sin = (angles.sin() * self.rope_scaling).to(dtype)
        return cos[:, None], sin[:, None]

    def prefill_logits(self, token_ids, positions, cache: StaticKVCache, mask):
        """The prompt [batch, len] into slots 0..len-1; float32 logits of its last position."""
        length = token_ids.shape[1]
        slots = torch.arange(length, device=token_ids.device)
        attend = functools.partial(prompt_attention, length=length, mask=mask, scale=self.scale)
        return self.run(token_ids, positions, slots, cache, attend)

    def decode_logits(self, token_ids, positions, input_pos, cache: StaticKVCache):
        """One token per sequence [batch, 1] into slot input_pos; float32 logits [batch, vocab]."""
        attend = functools.partial(cached_attention, valid=cache.valid, scale=self.scale)
        return self.run(token_ids, positions, input_pos, cache, attend)

    def run(self, token_ids, positions, slots, cache, attend):
        x = self.embed_tokens(token_ids)
        rope = self.rope_tables(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, cache.keys[i], cache.values[i], slots, attend)
        # the norm works per position, so normalising only the last one gives the same logits
        return self.lm_head(self.norm(x[:, -1])).float()
