"""The LLM lane's fast path: a static KV cache, and a decode step the GPU replays as one CUDA graph.

    for ev in llm.stream("The cat sat", max_new_tokens=64):                  # CUDA + Llama/Qwen2: this path
    for ev in llm.stream("The cat sat", max_new_tokens=64, fast_path=False):  # the plain loop
    llm.stream("The cat sat", fast_path=True)                                 # this path on the CPU too (eager)

The plain loop (text_generation.py) launches every kernel of every layer from Python, and at batch
1 a GPU finishes each kernel faster than Python can launch the next: decode runs at a few percent
of the bandwidth roofline (shared/ANCHORS.md). This path is gpt-fast's recipe, a ladder of small
steps:

    FastLlama         the transformers model's weights, laid out for decoding: q/k/v fused into one
                      matrix and gate/up into another (4 matmuls per block instead of 7); the other
                      weights are the model's own tensors, shared, not copied
    StaticKVCache     [batch, kv_heads, max_len, head_dim] per layer, allocated once, written in
                      place at `input_pos`
    prefill           the prompt in one eager forward; attention over the filled slots only, with
                      the fastest kernel the backends have (cuDNN or flash through SDPA on a GPU)
    decode_one_token  one token in, K/V written at input_pos, and out: the next token, its
                      log-probability and the top-N of the raw and the processed distributions,
                      all as device tensors (no .item(), no branching on values)
    CapturedStep      decode_one_token recorded once as a CUDA graph; each token is then one
                      replay, after an optional torch.compile of the model forward
    fast_generate     replays one step ahead of the host: the GPU computes token n + 1 while the
                      host turns token n into the same TokenStep events the plain loop yields

Every choice the graph forces, and what it costs:
  - Static shapes: decode attends over all max_len slots with a mask of the filled ones, so its
    attention reads the whole cache. The cache is therefore sized to the request (prompt plus new
    tokens, rounded up to a power of two so that few shapes are ever compiled): at most twice the
    slots needed. Prefill, not captured, slices to the filled length instead.
  - Sampling inside the graph: transformers' own temperature/top-k/top-p/min-p warpers (plain
    tensor code), the repetition penalty as the same rule over a static mask of seen tokens, and
    the draw as torch.multinomial makes it for one sample (argmax of probs / Exp(1) noise) with
    the noise drawn from the seeded generator just before each replay. The same seed therefore
    gives the plain loop's tokens, and no setting falls back to the slow path.
  - The cache is allocated whole: events report its full size as kv_cache_bytes from the start.
  - The sampler is not compiled: its settings are Python constants, and compiling them in would
    recompile (tens of seconds) whenever a slider moves; in the graph its kernels cost microseconds.

Depends on torch, transformers (the model it reads, its logits processors), the studio core and
pipelines.sampling / generation (the settings and the events); never on Gradio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from time import perf_counter
from typing import NamedTuple

import torch
from torch import nn
from transformers import LlamaForCausalLM, Qwen2ForCausalLM, RepetitionPenaltyLogitsProcessor

from studio import backends
from studio.cost import decoder_step_cost
from studio.profiling import StepTimer

from .generation import SequenceState, all_finished
from .sampling import SamplingSettings

log = logging.getLogger(__name__)

SUPPORTED_MODELS = (LlamaForCausalLM, Qwen2ForCausalLM)  # SmolLM2 and Llama 3 are LlamaForCausalLM
MIN_CACHE_LENGTH = 256
WARMUP_STEPS = 3  # PyTorch's CUDA-graph recipe warms up 3 times before capturing


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot run this model, or None if it can."""
    if type(model) not in SUPPORTED_MODELS:
        names = ", ".join(cls.__name__ for cls in SUPPORTED_MODELS)
        return f"{type(model).__name__} is not a model the fast path implements ({names})"
    rope_type = model.model.rotary_emb.rope_type
    if rope_type in ("dynamic", "longrope"):
        return f"its RoPE ({rope_type!r}) rescales with the sequence length, which a static graph cannot follow"
    if any(kind != "full_attention" for kind in getattr(model.config, "layer_types", None) or []):
        return "it has sliding-window attention layers"
    return None


def wants_fast_path(pipeline, fast_path: bool | None, use_cache: bool, speculative: str | None) -> bool:
    """Resolve stream()'s fast_path argument. None: on for CUDA when the model and the request
    allow it, off otherwise (saying why in the log); True: on, or a clear error; False: off."""
    if fast_path not in (None, True, False):
        raise ValueError(f"fast_path must be True, False or None (on where it helps); got {fast_path!r}")
    if fast_path is False:
        return False
    reason = unsupported_reason(pipeline.model)
    if reason is None and not use_cache:
        reason = "use_cache=False asks for the cache-less staircase, which the fast path exists to flatten"
    if reason is None and speculative is not None:
        reason = "speculative decoding verifies drafts in the plain loop"
    if fast_path is None:
        if pipeline.device.type != "cuda":
            return False
        if reason is not None:
            log.info("fast path off, running the plain loop: %s", reason)
        return reason is None
    if reason is not None:
        raise ValueError(f"fast_path=True, but {reason}; use fast_path=None to pick the plain loop where needed")
    return True


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


def _shared_linear(layer) -> nn.Linear:
    """An nn.Linear holding `layer`'s own weight and bias tensors (no copy). `layer` may be wrapped
    by backends.apply_precision; its .weight is then the original's."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = layer.weight
    if layer.bias is not None:
        linear.bias = layer.bias
    return linear


def _fused_linear(*layers) -> nn.Linear:
    """One nn.Linear whose output rows are those of `layers`, stacked: one matmul reads the input
    once and launches once. A copy of the weights, built once."""
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in layers])
        biases = [layer.bias for layer in layers]
        bias = torch.cat(biases) if all(b is not None for b in biases) else None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


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

    def __init__(self, layer, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.wqkv = _fused_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.wo = _shared_linear(attn.o_proj)
        self.w13 = _fused_linear(mlp.gate_proj, mlp.up_proj)
        self.w2 = _shared_linear(mlp.down_proj)
        # the model's own norm and activation modules: the same arithmetic, bit for bit
        self.attention_norm = layer.input_layernorm
        self.mlp_norm = layer.post_attention_layernorm
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
    small model's weights again, in memory: the price of 4 matmuls per block instead of 7)."""

    def __init__(self, model):
        super().__init__()
        config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.scale = self.head_dim**-0.5
        self.embed_tokens = inner.embed_tokens
        self.layers = nn.ModuleList(
            FastBlock(layer, self.heads, self.kv_heads, self.head_dim) for layer in inner.layers
        )
        self.norm = inner.norm
        self.lm_head = _shared_linear(model.get_output_embeddings())
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


# ---------------------------------------------------------------------------------------------
# Sampling inside the step


class StepOutput(NamedTuple):
    """What one step hands out, per sequence: tensors on the device, or lists once on the host."""

    next_token: torch.Tensor  # [batch]
    logprob: torch.Tensor  # [batch] log-probability of next_token under the raw distribution
    top_raw_probs: torch.Tensor  # [batch, n] the n most likely tokens of the raw distribution
    top_raw_ids: torch.Tensor
    top_processed_probs: torch.Tensor  # [batch, n] the same after the sampling processors
    top_processed_ids: torch.Tensor


class StepSampler:
    """Logits -> StepOutput with tensor operations only, so that it runs inside a CUDA graph.

    The processors are the plain loop's (transformers' warpers, in generate()'s order), except the
    repetition penalty: transformers' reads the growing input_ids, so here the same rule runs over
    `seen`, a static [batch, vocab] mask of the tokens in the context."""

    def __init__(self, settings: SamplingSettings, top_n: int):
        self.greedy = settings.greedy
        penalty = settings.repetition_penalty
        self.penalty = penalty if penalty is not None and penalty != 1.0 else None
        self.warpers = [p for p in settings.processors() if not isinstance(p, RepetitionPenaltyLogitsProcessor)]
        self.top_n = top_n
        self.key = (dataclasses.replace(settings, seed=0), top_n)  # what a captured graph bakes in

    def __call__(self, logits, seen, noise) -> StepOutput:
        log_probs = torch.log_softmax(logits, dim=-1)
        scores = logits
        if self.penalty is not None:
            penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(seen, penalised, scores)
        for warper in self.warpers:
            scores = warper(None, scores)
        if self.greedy:
            next_token = scores.argmax(dim=-1)
        else:
            # torch.multinomial's own one-sample draw (the exponential race: argmax of p / Exp(1)),
            # minus its host-side validity check, which would break the graph; same noise, same token
            next_token = (torch.softmax(scores, dim=-1) / noise).argmax(dim=-1)
        n = min(self.top_n, logits.shape[-1])
        top_raw = log_probs.exp().topk(n)
        top_processed = torch.softmax(scores, dim=-1).topk(n)
        return StepOutput(
            next_token, log_probs.gather(-1, next_token[:, None])[:, 0], top_raw.values, top_raw.indices,
            top_processed.values, top_processed.indices,
        )


# ---------------------------------------------------------------------------------------------
# The decoder, its sessions and the captured step


class FastDecoder:
    """The fast path for one loaded model: its weights in FastLlama layout (in the model's matmul
    precision), the decode forward (compiled or not) and the session it decodes in.

    compile: torch.compile the decode forward before capture (default: on CUDA). graph: capture
    decode_one_token as a CUDA graph (default: on CUDA; CUDA only). Built once per model and
    precision by `decoder_for`; to change a setting, assign a new one to `pipeline.fast_decoder`.
    """

    def __init__(self, model, precision: str | None = None, *, compile: bool | None = None, graph: bool | None = None):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast path cannot run this model: {reason}")
        self.source = model
        self.model = FastLlama(model).eval()
        self.precision = precision
        if precision is not None:
            backends.apply_precision(self.model, precision)
        self.device = self.model.lm_head.weight.device
        self.dtype = self.model.embed_tokens.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.graph = on_cuda if graph is None else graph
        if self.graph and not on_cuda:
            raise ValueError(f"CUDA graphs need a CUDA device; this model is on {self.device.type}")
        forward = self.model.decode_logits
        # not fullgraph: a graph break (a precision wrapper setting a global flag, say) costs a
        # little speed, and the CUDA graph records the eager pieces between compiled ones too
        self.decode_forward = torch.compile(forward, dynamic=False) if self.compile else forward
        self._session: DecodeSession | None = None
        self._busy = False
        self._lock = threading.Lock()

    def matches(self, model, precision) -> bool:
        """Whether this decoder still mirrors `model`: the same model, precision, dtype and device.
        (Weights changed in place are not seen by the fused copies: set pipeline.fast_decoder = None.)"""
        weight = model.get_output_embeddings().weight
        layout = (weight.dtype, weight.device) == (self.dtype, self.device)
        return model is self.source and precision == self.precision and layout

    @contextlib.contextmanager
    def session(self, batch: int, max_len: int, sampler: StepSampler):
        """A session for these shapes and settings: the kept one when it fits (its cache and graph
        are reused), a replacement when it does not. A stream running while another holds the
        kept session gets a session of its own, dropped when it ends."""
        key = (batch, max_len, sampler.key)
        with self._lock:
            separate = self._busy
            self._busy = True
            if not separate and self._session is not None and self._session.key != key:
                self._session = None  # free its cache and graph before allocating the next
        try:
            if separate:
                yield DecodeSession(self, batch, max_len, sampler)
            else:
                if self._session is None:
                    self._session = DecodeSession(self, batch, max_len, sampler)
                yield self._session
        finally:
            if not separate:
                with self._lock:
                    self._busy = False

    @property
    def last_session(self) -> DecodeSession | None:
        return self._session


def decoder_for(pipeline) -> FastDecoder:
    """The pipeline's FastDecoder, rebuilt when its model or matmul precision changed (keeping
    the compile and graph settings of the one it replaces)."""
    precision = backends.precision_of(pipeline.model)
    current = pipeline.fast_decoder
    if current is None or not current.matches(pipeline.model, precision):
        options = dict(compile=current.compile, graph=current.graph) if current is not None else {}
        pipeline.fast_decoder = FastDecoder(pipeline.model, precision, **options)
    return pipeline.fast_decoder


class DecodeSession:
    """One batch size, one cache length, one set of sampling settings: the static cache, the decode
    step's inputs (which the step itself advances) and, on CUDA, its captured graph."""

    def __init__(self, decoder: FastDecoder, batch: int, max_len: int, sampler: StepSampler):
        model, device = decoder.model, decoder.device
        self.key = (batch, max_len, sampler.key)
        self.model, self.sampler, self.forward = model, sampler, decoder.decode_forward
        self.cache = StaticKVCache(
            len(model.layers), batch, model.kv_heads, max_len, model.head_dim, decoder.dtype, device
        )
        # the step's inputs: static tensors, so that a graph replays them
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # the token fed in, per sequence
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot it is written to
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)  # its RoPE position: slot - left padding
        self.seen = torch.zeros(batch, model.vocab, dtype=torch.bool, device=device) if sampler.penalty else None
        self.noise = None if sampler.greedy else torch.ones(batch, model.vocab, device=device)
        self.warmup_s = self.capture_s = None
        self.step = lambda: self.decode_one_token(self.token, self.input_pos)
        if device.type == "cuda":
            self.warmup_s = self._warm_up(device)
            if decoder.graph:
                started = perf_counter()
                self.step = CapturedStep(self.decode_one_token, self.token, self.input_pos)
                self.capture_s = perf_counter() - started

    def prefill(self, input_ids, attention_mask, generator) -> StepOutput:
        """The prompt in one eager forward: K/V into slots 0..len-1, token 0 chosen by the same
        sampler the decode step uses. It resets every piece of state the step reads, so one
        session serves call after call (and warm-up leaves nothing behind)."""
        length = input_ids.shape[1]
        valid = self.cache.valid
        valid.zero_()
        valid[:, :length] = attention_mask.bool()
        # left padding shifts each prompt: positions count real tokens only, as the plain loop's do
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        padded = not bool(attention_mask.all())  # one host sync per prompt, outside any graph
        mask = valid[:, None, None, :length] if padded else None
        logits = self.model.prefill_logits(input_ids, positions, self.cache, mask)
        if self.seen is not None:
            self.seen.zero_()
            self.seen.scatter_(1, input_ids, True)
        self._draw_noise(generator)
        out = self.sampler(logits, self.seen, self.noise)
        self.token.copy_(out.next_token)
        self.input_pos.fill_(length)
        self.positions.copy_(attention_mask.sum(-1))
        self.cache.filled = length
        return out

    def decode_one_token(self, token, input_pos) -> StepOutput:
        """One token per sequence in, its K and V written at input_pos, the next token out with its
        log-probability and the top-N of both distributions. It then writes the chosen token and
        the next slot back into `token` and `input_pos`, so that replay after replay continues on
        the device without the host handing anything in."""
        self.cache.valid.index_fill_(1, input_pos, True)  # the new token attends to itself too
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        logits = self.forward(token[:, None], self.positions[:, None], input_pos, self.cache)
        out = self.sampler(logits, self.seen, self.noise)
        token.copy_(out.next_token)
        input_pos.add_(1)
        self.positions.add_(1)
        return out

    def decode(self, generator) -> StepOutput:
        """The next token: one replay of the captured step (or one eager call)."""
        self._draw_noise(generator)
        out = self.step()
        self.cache.filled += 1
        return out

    def _draw_noise(self, generator):
        # drawn outside the graph from the seeded generator: a replay then needs no RNG state of its own
        if self.noise is not None:
            self.noise.exponential_(1, generator=generator)

    def _warm_up(self, device) -> float:
        """Run the step a few times on a side stream first, as PyTorch's CUDA-graph recipe does:
        cuBLAS workspaces, kernel autotuning and torch.compile all happen on first calls, and none
        may happen during capture. Returns the seconds taken: with compile, the compile time of a
        shape seen for the first time. The state it advances is reset by prefill."""
        started = perf_counter()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP_STEPS):
                self.decode_one_token(self.token, self.input_pos)
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        return perf_counter() - started


class CapturedStep:
    """A step recorded once as a CUDA graph; calling it replays the graph (one launch for the
    whole step) and returns its output tensors, which the next replay overwrites."""

    def __init__(self, step, *inputs):
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a stream on another thread (the app serves several) may use the GPU meanwhile
        with torch.no_grad(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = step(*inputs)

    def __call__(self) -> StepOutput:
        self.graph.replay()
        return self.outputs


class PendingStep:
    """A step's outputs on their way to the host. On a GPU the copies are queued behind the step,
    into pinned memory, and `result()` waits for them alone; in between the host is free to queue
    the next step, whose replay would overwrite a graph's outputs but not these copies."""

    def __init__(self, out: StepOutput):
        self.done = None
        if out.next_token.device.type == "cuda":
            out = StepOutput(*(t.to("cpu", non_blocking=True) for t in out))
            self.done = torch.cuda.Event()
            self.done.record()
        self.out = out

    def result(self) -> StepOutput:
        if self.done is not None:
            self.done.synchronize()
        return StepOutput(*(t.tolist() for t in self.out))


# ---------------------------------------------------------------------------------------------
# The loop


def fast_generate(pipeline, input_ids, attention_mask, request):
    """The plain loop's events (prefill, then one per decode step) from the fast path."""
    decoder = decoder_for(pipeline)
    batch, length = input_ids.shape
    max_len = cache_length(length + request.max_new_tokens, pipeline.context_length)
    generator = torch.Generator(pipeline.device).manual_seed(request.settings.seed)
    sequences = [SequenceState(i, request, pipeline.tokenizer) for i in range(batch)]
    timer = StepTimer(pipeline.device)
    with decoder.session(batch, max_len, StepSampler(request.settings, request.top_logprobs)) as session:
        with timer.time() as timing, torch.no_grad(), backends.use(attention=request.attention):
            out = session.prefill(input_ids, attention_mask, generator)
        pending = PendingStep(out)
        for index in range(request.max_new_tokens):
            # queue token index + 1 before waiting for token index: the device decodes the next
            # token while the host turns this one into events (a token past an end is discarded)
            if index + 1 < request.max_new_tokens:
                with timer.time() as next_timing, torch.no_grad():
                    out = session.decode(generator)
                following = PendingStep(out)
            q_len = length if index == 0 else 1
            flops, bytes_moved = decoder_step_cost(pipeline.shape, batch, q_len, length + index)
            shapes = _highway_shapes(decoder.model, batch, q_len)
            step = pending.result()
            for sequence in sequences:
                if sequence.finished:
                    continue
                i = sequence.index
                sequence.advance(step.next_token[i])
                yield sequence.event(
                    "prefill" if index == 0 else "decode", index, timing, logprob=step.logprob[i],
                    top=(step.top_raw_ids[i], step.top_raw_probs[i]),
                    top_processed=(step.top_processed_ids[i], step.top_processed_probs[i]),
                    kv_cache_bytes=session.cache.nbytes, flops=flops, bytes=bytes_moved, shapes=shapes,
                )
            if all_finished(sequences, request):
                return
            pending, timing = following, next_timing


def _highway_shapes(model: FastLlama, batch: int, q_len: int) -> dict[str, tuple[int, ...]]:
    """The shapes along the highway, as the plain loop reports them from its hidden states."""
    shapes = {"token_ids": (batch, q_len), "embeddings": (batch, q_len, model.hidden)}
    for i in range(len(model.layers)):
        shapes[f"block {i}"] = (batch, q_len, model.hidden)
    shapes["logits"] = (batch, 1, model.vocab)
    return shapes
