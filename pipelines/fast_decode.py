"""The LLM lane's fast path: a static KV cache, and a compiled decode step (replayed as one CUDA
graph on a GPU).

    for ev in llm.stream("The cat sat", max_new_tokens=64):                  # Llama/Qwen2: this path
    for ev in llm.stream("The cat sat", max_new_tokens=64, fast_path=False):  # the plain loop
    llm.fast_decoder = FastDecoder(llm.model, compile="background")          # CPU: compile new shapes
    llm.fast_decoder.warm_up()                                               # off the request's path

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

On the CPU there is no graph to replay, and the step is bound by bytes and by per-operation
overhead. So: the weights go to bf16 where the CPU multiplies bf16 in hardware (half the bytes;
`cpu_weight_format` says which and why), and the forward is compiled by inductor with `freezing`
(the weights become constants that oneDNN prepacks for its matmul kernels: ~2x over the eager
step) and `cpp_wrapper` (the compiled graph is called from C++, not Python). Compiling takes
tens of seconds per shape the first time (inductor caches it on disk after that), so
compile="background" runs each new shape eagerly while a thread compiles it.

If compiling, capturing or running the fast path fails, nothing breaks for the user: a failed
compile leaves the step eager, a failed capture leaves it uncaptured, and any other failure
before the first token makes the request run the plain loop; the reason is said once (the
event's `notice`) and remembered, so later requests do not try the failing path again.

Depends on torch, transformers (the model it reads, its logits processors), the studio core and
pipelines.sampling / generation (the settings and the events); never on Gradio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import types
from time import perf_counter
from typing import NamedTuple

import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM, RepetitionPenaltyLogitsProcessor

from studio import backends
from studio.backends.precision import CAST_DTYPES, cpu_weight_format
from studio.cost import decoder_step_cost
from studio.profiling import StepTimer

from .fast_llama import MIN_CACHE_LENGTH, FastLlama, StaticKVCache, cache_length
from .generation import SequenceState, all_finished
from .sampling import SamplingSettings

log = logging.getLogger(__name__)

SUPPORTED_MODELS = (LlamaForCausalLM, Qwen2ForCausalLM)  # SmolLM2 and Llama 3 are LlamaForCausalLM
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


def wants_fast_path(pipeline, fast_path: bool | None, use_cache: bool, speculative: str | None,
                    adapter: str | None = None) -> bool:
    """Resolve stream()'s fast_path argument. None: on where the model and the request allow it
    and it has not failed on this device, off otherwise (saying why in the log); True: on, or a
    clear error; False: off."""
    if fast_path not in (None, True, False):
        raise ValueError(f"fast_path must be True, False or None (on where it helps); got {fast_path!r}")
    if fast_path is False:
        return False
    reason = unsupported_reason(pipeline.model)
    if reason is None and not use_cache:
        reason = "use_cache=False asks for the cache-less staircase, which the fast path exists to flatten"
    if reason is None and speculative is not None:
        reason = "speculative decoding verifies drafts in the plain loop"
    if reason is None and adapter is not None:
        reason = "a LoRA adapter runs unmerged in the plain loop (its hooks sit on layers the fast path fuses)"
    if reason is None and pipeline.fast_path_error is not None:
        reason = pipeline.fast_path_error
    if fast_path is None:
        if reason is not None:
            log.info("fast path off, running the plain loop: %s", reason)
        return reason is None
    if reason is not None:
        raise ValueError(f"fast_path=True, but {reason}; use fast_path=None to pick the plain loop where needed")
    return True


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
    precision, or the CPU's fastest format), the decode forward (compiled or not) and the session
    it decodes in.

    compile: torch.compile the decode forward; True compiles a new shape when it is first met,
    "background" runs it eagerly meanwhile and compiles in a thread (default: True on CUDA, off
    on the CPU; the app and the server use "background"). graph: capture decode_one_token as a
    CUDA graph (default: on CUDA; CUDA only). weights: the matmul precision of a model that has
    none of its own: "auto" (the CPU's fastest format, see cpu_weight_format), None (the model's
    own dtype: the plain loop's tokens exactly) or a precision name. Built once per model and
    precision by `decoder_for`; to change a setting, assign a new one to `pipeline.fast_decoder`.
    """

    def __init__(self, model, precision: str | None = None, *, compile: bool | str | None = None,
                 graph: bool | None = None, weights: str | None = "auto"):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast path cannot run this model: {reason}")
        if compile not in (None, True, False, "background"):
            raise ValueError(f"compile must be True, False, 'background' or None; got {compile!r}")
        self.source = model
        self.source_dtype = model.get_output_embeddings().weight.dtype
        self.precision = precision  # the model's own, which this decoder mirrors
        device = model.get_output_embeddings().weight.device
        self.weights_option = weights
        if precision is not None:
            self.weights, self.weights_reason = precision, f"the matmul precision chosen for the model ({precision})"
        elif weights == "auto":
            self.weights, self.weights_reason = cpu_weight_format(device)
        else:
            self.weights, self.weights_reason = weights, "asked for" if weights else "the model's own dtype, as asked"
        # a float format lays the weights out in that dtype (no wrappers, activations and cache in it
        # too); int8 and fp8 wrap the fused layers, as the plain model's are wrapped
        layout = CAST_DTYPES.get(self.weights) if precision is None else None
        self.model = FastLlama(model, layout).eval()
        if self.weights is not None and layout is None:
            backends.apply_precision(self.model, self.weights)
        self.device = device
        self.dtype = self.model.embed_tokens.weight.dtype
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.graph = on_cuda if graph is None else graph
        if self.graph and not on_cuda:
            raise ValueError(f"CUDA graphs need a CUDA device; this model is on {self.device.type}")
        self.eager_forward = self.model.decode_logits
        # torch.compile keeps what it compiled per code object, with guards that look into the
        # module; a decoder of another layout (int8 wrappers, bf16 copies) meeting them makes torch
        # 2.13 fail (KeyError) while it explains the recompile. Each decoder compiles its own copy.
        own_copy = types.FunctionType(FastLlama.decode_logits.__code__.replace(), FastLlama.decode_logits.__globals__,
                                      "decode_logits", FastLlama.decode_logits.__defaults__)
        # not fullgraph: a graph break (a precision wrapper setting a global flag, say) costs a
        # little speed, and the CUDA graph records the eager pieces between compiled ones too.
        # On the CPU, freezing lets oneDNN prepack the weights and cpp_wrapper drops the Python
        # between kernels; options= keeps both to this compile instead of inductor's global config.
        self.compile_options = None if on_cuda else {"freezing": True, "cpp_wrapper": True}
        self.to_compile = types.MethodType(own_copy, self.model)
        # made by the first compile (torch.compile's first call imports the compiler: about a
        # second, which a background compile keeps off the model's loading)
        self.compiled_forward = None
        self.compiled: dict[tuple[int, int], float] = {}  # (batch, cache length) -> seconds its compile took
        self.compile_error: str | None = None  # why compiling failed: the step then stays eager
        self.capture_error: str | None = None  # why capturing failed: the step then runs uncaptured
        self._told: set[str] = set()
        self._compiling: set[tuple[int, int]] = set()
        # background compiles wait for this before they start (the app sets it once another process
        # has put the compiled code in inductor's on-disk cache); None: they start at once
        self.compile_after: threading.Event | None = None
        self._session: DecodeSession | None = None
        self._busy = False
        self._lock = threading.Lock()

    def matches(self, model, precision) -> bool:
        """Whether this decoder still mirrors `model`: the same model, precision, dtype and device.
        (Weights changed in place are not seen by the fused copies: set pipeline.fast_decoder = None.)"""
        weight = model.get_output_embeddings().weight
        layout = (weight.dtype, weight.device) == (self.source_dtype, self.device)
        return model is self.source and precision == self.precision and layout

    def forward_for(self, batch: int, max_len: int):
        """The decode forward for these shapes: compiled where it is (or, compile=True, compiles it
        now), eager while a background compile runs or after a compile failed."""
        shape = (batch, max_len)
        if not self.compile or self.compile_error is not None:
            return self.eager_forward
        if shape not in self.compiled:
            if self.compile == "background":
                self.warm_up(batch, max_len, background=True)
                return self.eager_forward
            self.warm_up(batch, max_len)
        return self.compiled_forward if self.compile_error is None else self.eager_forward

    def warm_up(self, batch: int = 1, max_len: int = MIN_CACHE_LENGTH, background: bool = False):
        """Compile the decode forward for these shapes now, on a scratch cache, and record how long
        it took (`compiled`); background=True does it in a thread and returns at once. A failure
        is recorded in `compile_error` (the step then stays eager), never raised."""
        shape = (batch, max_len)
        with self._lock:
            if not self.compile or shape in self.compiled or shape in self._compiling:
                return
            self._compiling.add(shape)
        if background:
            threading.Thread(target=self._compile, args=shape, daemon=True, name=f"compile {shape}").start()
        else:
            self._compile(*shape)

    @property
    def compiling(self) -> bool:
        """Whether a background compile is running."""
        return bool(self._compiling)

    def _compile(self, batch: int, max_len: int):
        if threading.current_thread() is not threading.main_thread() and hasattr(os, "setpriority"):
            # a background compile yields the CPU to the requests running eagerly meanwhile (Linux
            # sets niceness per thread; inductor's compiler processes inherit it)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            if self.compile_after is not None:
                self.compile_after.wait()
        model = self.model
        cache = StaticKVCache(len(model.layers), batch, model.kv_heads, max_len, model.head_dim, self.dtype, self.device)
        # the step's own inputs, separate tensors: compiled for one tensor passed twice, the first
        # real call (token ids and positions apart) would fail a guard and compile again
        token, position = (torch.zeros(batch, 1, dtype=torch.long, device=self.device) for _ in range(2))
        started = perf_counter()
        try:
            if self.compiled_forward is None:
                self.compiled_forward = torch.compile(self.to_compile, dynamic=False, options=self.compile_options)
            with torch.no_grad():
                self.compiled_forward(token, position, torch.zeros(1, dtype=torch.long, device=self.device), cache)
            self.compiled[(batch, max_len)] = perf_counter() - started
        except Exception as error:  # any failure of the compiler: the eager step is still right
            self.compile_error = f"compiling the decode step failed ({first_line(error)}); it runs uncompiled"
            log.warning("fast path: %s", self.compile_error)
        finally:
            with self._lock:
                self._compiling.discard((batch, max_len))

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

    def news(self) -> str | None:
        """A failure of compiling or capturing the user has not been told about yet (once each)."""
        untold = [e for e in (self.compile_error, self.capture_error) if e and e not in self._told]
        self._told.update(untold)
        return "; ".join(untold) or None

    def status(self) -> str:
        """One line for the user: the weights, and whether (and how fast) the step compiled."""
        weights = self.weights or str(self.dtype).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")
        if not self.compile:
            compiled = "eager"
        elif self.compile_error:
            compiled = self.compile_error
        elif self.compiled:
            compiled = "compiled (" + ", ".join(f"{s:.0f} s" for s in self.compiled.values()) + ")"
        else:
            compiled = "compiling in the background, eager meanwhile" if self._compiling else "compiles on first use"
        captured = f"; {self.capture_error}" if self.capture_error else ""
        return f"fast path: {weights} weights ({self.weights_reason}); decode step {compiled}{captured}"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def decoder_for(pipeline) -> FastDecoder:
    """The pipeline's FastDecoder, rebuilt when its model or matmul precision changed (keeping
    the compile, graph and weights settings of the one it replaces)."""
    precision = backends.precision_of(pipeline.model)
    current = pipeline.fast_decoder
    if current is None or not current.matches(pipeline.model, precision):
        options = dict(compile=current.compile, graph=current.graph, weights=current.weights_option) if current else {}
        pipeline.fast_decoder = FastDecoder(pipeline.model, precision, **options)
    return pipeline.fast_decoder


class DecodeSession:
    """One batch size, one cache length, one set of sampling settings: the static cache, the decode
    step's inputs (which the step itself advances) and, on CUDA, its captured graph."""

    def __init__(self, decoder: FastDecoder, batch: int, max_len: int, sampler: StepSampler):
        model, device = decoder.model, decoder.device
        self.key = (batch, max_len, sampler.key)
        self.decoder, self.model, self.sampler, self.shape = decoder, model, sampler, (batch, max_len)
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
            if decoder.graph and decoder.capture_error is None:
                started = perf_counter()
                try:
                    self.step = CapturedStep(self.decode_one_token, self.token, self.input_pos)
                except Exception as error:  # the uncaptured step computes the same tokens
                    decoder.capture_error = f"capturing the decode step failed ({first_line(error)}); it runs uncaptured"
                    log.warning("fast path: %s", decoder.capture_error)
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
        forward = self.decoder.forward_for(*self.shape)
        logits = forward(token[:, None], self.positions[:, None], input_pos, self.cache)
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


def fast_generate(pipeline, input_ids, attention_mask, request, *, fallback):
    """The plain loop's events from the fast path; the plain loop itself (`fallback`) if the fast
    path fails before its first event, with the reason told on that run's first event and kept
    on the pipeline (`fast_path_error`) so that later requests go straight to the plain loop."""
    events = _fast_events(pipeline, input_ids, attention_mask, request)
    try:
        first = next(events)
    except StopIteration:
        return
    except Exception as error:  # set-up, compile, capture or the first steps: nothing shown yet
        pipeline.fast_path_error = f"the fast path failed on {pipeline.device.type} ({first_line(error)})"
        log.warning("%s; running the plain loop", pipeline.fast_path_error)
        events = fallback(pipeline, input_ids, attention_mask, request)
        first = next(events)
        first.notice = f"{pipeline.fast_path_error}: this and later requests run the plain loop"
    yield first
    yield from events


def _fast_events(pipeline, input_ids, attention_mask, request):
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
                    notice=decoder.news() if index == 0 and sequence.index == 0 else None,
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
