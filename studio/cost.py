"""The runtime cost model both lanes and the inspector share: the work (FLOPs) and the traffic
(bytes) of a step, from a model's shape.

A decoder step over `q_len` new tokens with `kv_len` keys in view multiplies every weight matrix
once per token (2 FLOPs per weight per token), attends over the keys (4·heads·head_dim FLOPs per
query-key pair: Q·Kᵀ and P·V), and must read every weight matrix and the whole KV cache from
memory at least once. At batch 1 decode that is ~2 FLOPs per byte of weights: far below any
GPU's ridge point, hence memory-bound. Prefill does the same reads for many tokens at once:
compute-bound.

Depends on torch only. Never imports a pipeline, the inspector or the UI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecoderShape:
    """The numbers of a decoder-only transformer that decide its cost."""

    matmul_params: int  # weights multiplied per token: every 2-D weight except embedding lookups
    lm_head_params: int  # of those, the output projection to the vocabulary
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, for every layer and K/V head: what the cache grows by per token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def decoder_shape(model: torch.nn.Module) -> DecoderShape:
    """Read a loaded transformers decoder's shape from its modules and config."""
    config = model.config.get_text_config()
    # An embedding lookup reads one row per token, not the matrix; every other 2-D weight
    # (nn.Linear, GPT-2's Conv1D, a tied lm_head) is a matmul over all of it.
    matmul_params = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and id(weight) not in seen:
            seen.add(id(weight))
            matmul_params += weight.numel()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(model.parameters()).dtype
    return DecoderShape(
        matmul_params=matmul_params,
        lm_head_params=model.get_output_embeddings().weight.numel(),
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        dtype_bytes=torch.finfo(dtype).bits // 8,
    )


def decoder_step_cost(shape: DecoderShape, batch: int, q_len: int, kv_len: int, logits_len: int = 1) -> tuple[int, int]:
    """(FLOPs, bytes) of one forward over q_len new tokens per sequence with kv_len keys in view.

    Causal attention lets query i see kv_len - q_len + i + 1 keys; we count exactly those.
    Bytes: the weights once, the KV cache read (kv_len - q_len old tokens) and written (q_len new
    ones), and the logits written; activations between layers are left out (they are small next
    to the weights at the batch sizes this studio shows).
    """
    tokens = batch * q_len
    # the lm_head only runs for the positions whose logits are kept (the last one when generating)
    matmul = 2 * (shape.matmul_params - shape.lm_head_params) * tokens + 2 * shape.lm_head_params * batch * logits_len
    visible = q_len * (kv_len - q_len) + q_len * (q_len + 1) // 2  # keys seen, summed over queries
    attention = 4 * batch * shape.layers * shape.heads * shape.head_dim * visible
    kv_read = batch * (kv_len - q_len) * shape.kv_bytes_per_token
    kv_written = tokens * shape.kv_bytes_per_token
    logits = batch * logits_len * shape.vocab * 4
    bytes_moved = shape.matmul_params * shape.dtype_bytes + kv_read + kv_written + logits
    return matmul + attention, bytes_moved


def tensor_bytes(value) -> int:
    """Bytes of every tensor in a value (a tensor, or dicts/tuples/lists of them); meta tensors count too."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0
