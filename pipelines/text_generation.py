"""The LLM lane: text -> tokens -> prefill -> one decode step per token, every step observable.

    llm = TextGenerationPipeline.from_pretrained("smollm2-135m")
    for ev in llm.stream("The cat sat", max_new_tokens=16):
        print(ev.phase, ev.text, ev.top, ev.ms)

The loop is ours; the model is transformers' own. It reads like the highway it implements:

    tokenize once -> prefill (the whole prompt in one forward, fills the KV cache, gives the first
    token) -> decode_step (one token in, its K and V appended to the cache, one token out) ↺ until
    an end-of-sequence token, a stop string or the token limit.

With use_cache=False every step re-runs the whole sequence instead, so each token costs more than
the last: the staircase the KV cache flattens. `stream()` checks the request, tokenizes, and runs
one of three loops: `generate` below (the plain one), `fast_generate` (fast_decode.py: static
cache, compiled or CUDA-graph decode step) or `speculative_generate` (speculative.py). All three
yield the same events, built by generation.py, and none imports another.

Depends on torch, transformers, the studio core and the lane's own modules; never on Gradio.
"""

from __future__ import annotations

import functools
import struct
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from studio import adapters, assets, backends
from studio.adapters import attached
from studio.backends.attention import check_name as check_attention_name
from studio.cost import decoder_shape, decoder_step_cost
from studio.integrations.transformers import use_studio_attention
from studio.loading import (
    LoadError,
    check_weights_format,
    resolve_device,
    resolve_dtype,
)
from studio.profiling import StepTimer
from studio.values import lone_surrogate

from .fast_decode import fast_generate, wants_fast_path
from .generation import (
    Collected,
    GenerationOutput,
    GenerationRequest,
    SequenceState,
    TokenStep,
    all_finished,
    cache_keyword,
    decode_text,
    kv_cache_bytes,
)
from .sampling import SamplingSettings, choose_token, top_tokens
from .speculative import speculative_generate


class TextGenerationPipeline:
    timing_kind = "device"  # step times are device time (CUDA events, or the CPU's clock); see pipelines.remote

    def __init__(self, model, tokenizer, device=None, attention: str | None = None, precision: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.attention = attention
        self.precision = precision
        use_studio_attention(self.model)
        self.shape = decoder_shape(self.model)
        self.cache_keyword = cache_keyword(self.model)
        config = self.model.config.get_text_config()
        self.context_length = getattr(config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids, default=0)
        self.adapters: dict[str, adapters.Adapter] = {}  # the LoRA adapters loaded, by name
        self.fast_decoder = None  # the fast path's decoder (fast_decode.py), built on first use
        self.fast_path_error: str | None = None  # why the fast path failed here: it is not tried again

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | torch.device | None = None,
        attention: str | None = None,
        precision: str | None = None,
        dtype: str | torch.dtype | None = None,
        allow_pickle: bool = False,
    ) -> "TextGenerationPipeline":
        """Load a causal LM by hub id, local folder or .gguf file; a shipped name resolves to its
        folder. safetensors only unless allow_pickle=True; remote code is never run."""
        if attention is not None:
            check_attention_name(attention)  # fail before the slow part
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        path = assets.resolve(name_or_path)
        kwargs = dict(trust_remote_code=False)
        if str(path).endswith(".gguf"):
            kwargs["gguf_file"] = Path(path).name
            path = str(Path(path).parent)
        else:
            check_weights_format(path, allow_pickle)
            kwargs["use_safetensors"] = None if allow_pickle else True
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        # SafetensorError: a damaged safetensors file; struct.error and KeyError: a truncated or
        # incomplete GGUF file, which the gguf reader unpacks without checking its length
        except (OSError, ValueError, RuntimeError, SafetensorError, struct.error, KeyError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LoadError(
                f"could not load the language model {name_or_path!r}: {first}. Use a shipped name "
                f"({', '.join(assets.list_models('llm'))}), a local folder with safetensors weights, or a hub "
                "id while online"
            ) from error
        return cls(model.to(device), tokenizer, device, attention=attention, precision=precision)

    # -----------------------------------------------------------------------------------------
    # The public API

    def __call__(self, prompt: str | list[str], **kwargs) -> GenerationOutput | list[GenerationOutput]:
        outputs = [Collected() for _ in prompt_list(prompt)]
        for event in self.stream(prompt, **kwargs):
            outputs[event.sequence].add(event)
        stops = kwargs.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        # the final text is decoded whole: streamed pieces can differ where a model emits invalid UTF-8
        results = [collected.output(self.decode(collected.token_ids, stops)[0]) for collected in outputs]
        return results[0] if isinstance(prompt, str) else results

    def stream(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
        top_logprobs: int = 5,
        stop: list[str] | str | None = None,
        chat: bool = False,
        speculative: str | None = None,
        draft=None,
        num_draft_tokens: int = 4,
        stop_event: threading.Event | None = None,
        fast_path: bool | None = None,
        adapter: str | None = None,
    ):
        """An iterator of TokenSteps, one for every step: tokenize, prefill, then each decode step.

        speculative: None, "draft" (with draft= a TextGenerationPipeline or model sharing the
        tokenizer), "prompt-lookup" (n-grams of the context) or "self" (the target's first
        layers; draft= the number of layers, default a quarter). Stop between steps by closing
        the iterator or setting stop_event; the KV cache is freed either way.
        fast_path: a static KV cache and a compiled decode step, a CUDA graph on a GPU
        (fast_decode.py), same events; None: on where the model and request allow it, True: on,
        False: off. On a CPU with bf16 matmul instructions its weights are bf16, so it may pick
        another token where two are nearly tied; fast_path=False is the fp32 loop that matches
        transformers' generate() token for token.
        adapter: the name of a LoRA adapter loaded with load_adapter() to run with (None: the
        base model); it runs unmerged, in the plain loop.

        The request is checked, and the backends chosen (a `backends.use()` scope around this
        call, else the pipeline's defaults), when stream() is called; they hold for the whole run.
        """
        prompts = prompt_list(prompt)
        self.check_request(prompts, max_new_tokens, top_logprobs, num_draft_tokens, speculative, use_cache)
        if adapter is not None and (not isinstance(adapter, str) or adapter not in self.adapters):
            loaded = ", ".join(self.adapters) or "none; load one with load_adapter(path)"
            raise ValueError(f"no adapter named {adapter!r} is loaded; loaded: {loaded}")
        choice = backends.resolve(self.attention, self.precision)
        request = GenerationRequest(
            SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty, seed), max_new_tokens,
            top_logprobs, tuple([stop] if isinstance(stop, str) else stop or ()), frozenset(self.eos_token_ids),
            attention=choice.attention, stop_event=stop_event, adapter=adapter,
        )
        fast = wants_fast_path(self, fast_path, use_cache, speculative, adapter)
        if speculative is not None:
            loop = functools.partial(speculative_generate, mode=speculative, draft=draft, k=num_draft_tokens)
        elif fast:
            loop = functools.partial(fast_generate, fallback=functools.partial(generate, use_cache=True))
        else:
            loop = functools.partial(generate, use_cache=use_cache)
        return self._run(prompts, chat, request, choice.precision, loop)

    def _run(self, prompts, chat, request, precision, loop):
        backends.sync_precision([self.model], precision)
        # 1. tokenize once: the prompt becomes token ids, left-padded into one batch
        timer = StepTimer(self.device)
        with timer.time() as timing:
            input_ids, attention_mask = self._tokenize(prompts, chat)
        context = self.context_length
        if context is not None and input_ids.shape[1] + request.max_new_tokens > context:
            raise ValueError(
                f"the prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({request.max_new_tokens}) exceeds "
                f"the model's context of {context} tokens; shorten the prompt or lower max_new_tokens"
            )
        for i in range(len(prompts)):
            ids = input_ids[i][attention_mask[i].bool()].tolist()
            yield TokenStep(
                phase="tokenize", index=0, sequence=i, timing=timing, token_ids=ids,
                tokens=self.tokenizer.convert_ids_to_tokens(ids), shapes={"token_ids": (1, len(ids))},
            )
        # 2. and 3. prefill, then one decode step per token: in the loop chosen for this request
        yield from loop(self, input_ids, attention_mask, request)

    # -----------------------------------------------------------------------------------------
    # The model calls the loops make

    def prefill(self, input_ids, attention_mask, kv_cache, request):
        """The prompt in one forward pass: fills the KV cache, returns the last position's logits."""
        logits, shapes = self.forward(input_ids, attention_mask, kv_cache, request)
        return logits[:, -1], shapes

    def decode_step(self, input_ids, attention_mask, kv_cache, request):
        """One new token: with a cache only the newest token runs (its K and V join the cache); without
        one, the whole sequence runs again and every earlier K and V is recomputed."""
        new_ids = input_ids[:, -1:] if kv_cache is not None else input_ids
        logits, shapes = self.forward(new_ids, attention_mask, kv_cache, request)
        return logits[:, -1], shapes

    def forward(self, new_ids, attention_mask, kv_cache, request, logits_to_keep: int = 1):
        """The model over `new_ids` (the tokens the cache has not seen): float32 logits of the last
        `logits_to_keep` positions [batch, keep, vocab], and the shapes along the highway."""
        # left padding shifts each prompt: positions count real tokens only, as generate() does
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, -new_ids.shape[1] :]
        # the backend scope is entered around each model call, never held across a yield: a
        # generator may be resumed from another thread, where a held context would not apply
        adapter = self.adapters.get(request.adapter) if request.adapter else None
        with torch.no_grad(), backends.use(attention=request.attention), attached({"model": self.model}, adapter):
            out = self.model(
                input_ids=new_ids, attention_mask=attention_mask, position_ids=positions,
                **{self.cache_keyword: kv_cache}, use_cache=kv_cache is not None, logits_to_keep=logits_to_keep, output_hidden_states=True,
            )
        shapes = {"token_ids": tuple(new_ids.shape), "embeddings": tuple(out.hidden_states[0].shape)}
        for i, hidden in enumerate(out.hidden_states[1:]):
            shapes[f"block {i}"] = tuple(hidden.shape)
        shapes["logits"] = tuple(out.logits.shape)
        return out.logits.float(), shapes

    def decode(self, token_ids: list[int], stops: list[str]) -> tuple[str, bool]:
        """The text of generated tokens, cut before the first stop string; and whether one was found."""
        return decode_text(self.tokenizer, token_ids, stops)

    def load_adapter(self, path_or_name: str, name: str | None = None) -> str:
        """Load a peft LoRA adapter (a folder with adapter_config.json and adapter_model.safetensors,
        or a shipped adapter's name) for this model; returns the name to pass as stream(adapter=).
        The base model is left as it is: adapters run unmerged, per call."""
        path = assets.resolve(path_or_name)
        name = name or Path(path_or_name).name
        if not name or not name.strip():
            raise ValueError("an adapter needs a name; pass name=")
        self.adapters[name] = adapters.read_peft(path, self.model, name)
        return name

    # -----------------------------------------------------------------------------------------
    # Input handling

    def _tokenize(self, prompts, chat):
        if chat:
            if self.tokenizer.chat_template is None:
                raise ValueError("this model's tokenizer has no chat template; use chat=False for plain completion")
            prompts = [
                self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        self.tokenizer.padding_side = "left"  # new tokens go on the right, so padding goes left
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token_id = self.pad_token_id
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def check_request(self, prompts, max_new_tokens, top_logprobs, num_draft_tokens, speculative, use_cache):
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty; type some text to continue")
        for text in prompts:
            at = lone_surrogate(text)
            if at is not None:
                raise ValueError(f"the prompt holds a lone surrogate (U+{ord(text[at]):04X} at character {at}), half of "
                                 "a character, which is not valid Unicode; remove it")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens}")
        if self.context_length is not None and max_new_tokens > self.context_length:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) exceeds the model's context of {self.context_length} tokens")
        if not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0; got {top_logprobs}")
        if speculative is not None:
            if speculative not in ("draft", "prompt-lookup", "self"):
                raise ValueError(f"unknown speculative mode {speculative!r}; use 'draft', 'prompt-lookup' or 'self'")
            if len(prompts) > 1:
                raise ValueError("speculative decoding runs one prompt at a time")
            if not use_cache:
                raise ValueError("speculative decoding verifies drafts against the KV cache; it needs use_cache=True")
            if not isinstance(num_draft_tokens, int) or not 1 <= num_draft_tokens <= 16:
                raise ValueError(f"num_draft_tokens must be between 1 and 16; got {num_draft_tokens}")


def prompt_list(prompt) -> list[str]:
    """A prompt or a list of prompts, as a list; anything else is a ValueError saying what to give."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise ValueError(f"the prompt must be a string or a list of strings; got {type(prompt).__name__}")


# ---------------------------------------------------------------------------------------------
# The plain loop


def generate(pipeline, input_ids, attention_mask, request, *, use_cache: bool):
    """Prefill, then one decode step per token, each step's tokens turned into events. Without a
    cache every step runs the whole sequence again: the staircase."""
    settings, processors = request.settings, request.settings.processors()
    generator = torch.Generator(pipeline.device).manual_seed(settings.seed)
    sequences = [SequenceState(i, request, pipeline.tokenizer) for i in range(input_ids.shape[0])]
    kv_cache = DynamicCache(config=pipeline.model.config) if use_cache else None
    timer = StepTimer(pipeline.device)
    try:
        # 2. prefill: the whole prompt in one forward pass; its last position predicts token 0
        with timer.time() as timing:
            logits, shapes = pipeline.prefill(input_ids, attention_mask, kv_cache, request)
            scores = processors(input_ids, logits)
            next_tokens = choose_token(scores, settings, generator)
        phase, q_len = "prefill", input_ids.shape[1]
        for index in range(request.max_new_tokens):
            flops, bytes_moved = decoder_step_cost(pipeline.shape, input_ids.shape[0], q_len, input_ids.shape[1])
            for sequence, token in zip(sequences, next_tokens.tolist()):
                if sequence.finished:
                    continue
                sequence.advance(token)
                logprob, top, top_processed = top_tokens(
                    logits[sequence.index], scores[sequence.index], token, request.top_logprobs
                )
                yield sequence.event(
                    phase, index, timing, logprob=logprob, top=top, top_processed=top_processed,
                    kv_cache_bytes=kv_cache_bytes(kv_cache), flops=flops, bytes=bytes_moved, shapes=shapes,
                )
            if all_finished(sequences, request):
                return
            # finished sequences keep receiving padding, as in generate(), so the batch stays square
            done = torch.tensor([s.finished for s in sequences], device=pipeline.device)
            next_tokens = next_tokens.masked_fill(done, pipeline.pad_token_id)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)[:, None]], dim=1)

            # 3. decode: one token in (or, without a cache, the whole sequence again), one out
            with timer.time() as timing:
                logits, shapes = pipeline.decode_step(input_ids, attention_mask, kv_cache, request)
                scores = processors(input_ids, logits)
                next_tokens = choose_token(scores, settings, generator)
            phase, q_len = "decode", 1 if use_cache else input_ids.shape[1]
    finally:
        # stopped, finished or failed: drop the cache now rather than when the generator is collected
        del kv_cache
        if pipeline.device.type == "cuda":
            torch.cuda.empty_cache()
