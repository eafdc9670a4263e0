"""The LLM lane: text -> tokens -> prefill -> one decode step per token, every step observable.

    llm = TextGenerationPipeline.from_pretrained("smollm2-135m")
    for ev in llm.stream("The cat sat", max_new_tokens=16):
        print(ev.phase, ev.text, ev.top, ev.ms)

The loop is ours; the model is transformers' own. It reads like the highway it implements:

    tokenize once -> prefill (the whole prompt in one forward, fills the KV cache, gives the first
    token) -> decode_step (one token in, its K and V appended to the cache, one token out) ↺ until
    an end-of-sequence token, a stop string or the token limit.

With use_cache=False every step re-runs the whole sequence instead, so each token costs more than
the last: the staircase the KV cache flattens. Speculative decoding lives in speculative.py, the
GPU fast path (static cache, CUDA-graph decode step, same events) in fast_decode.py.

Depends on torch, transformers and the studio core; never on Gradio.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from studio import assets, backends
from studio.backends.attention import check_name as check_attention_name
from studio.events import Step
from studio.cost import decoder_shape, decoder_step_cost
from studio.integrations.transformers import use_studio_attention
from studio.loading import LoadError, check_weights_format, resolve_device, resolve_dtype
from studio.profiling import StepTimer

from .sampling import SamplingSettings, choose_token, top_alternatives


@dataclass(kw_only=True)
class TokenStep(Step):
    """One step of the LLM lane. phase: "tokenize" | "prefill" | "decode"."""

    sequence: int = 0  # which prompt of a batch this event belongs to
    token_id: int | None = None  # the token chosen at this step
    text: str | None = None  # the text it added (may be empty while a character is incomplete)
    logprob: float | None = None  # log-probability of the chosen token under the model's raw distribution
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (text, id, prob), the model's raw distribution
    top_processed: list[tuple[str, int, float]] = field(default_factory=list)  # after the sampling processors
    kv_cache_bytes: int | None = None  # bytes held by the KV cache after this step
    token_ids: list[int] | None = None  # tokenize: the prompt's token ids
    tokens: list[str] | None = None  # tokenize: the prompt's tokens as text
    finish_reason: str | None = None  # on a sequence's last event: "eos" | "stop" | "length"
    # speculative decoding: the round's draft, whether this token was a draft the target accepted
    drafted: list[int] | None = None
    from_draft: bool | None = None
    rejected: list[int] | None = None


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # the generated tokens (the prompt's are in steps[0].token_ids)
    steps: list[TokenStep]
    finish_reason: str
    acceptance_rate: float | None = None  # speculative decoding: accepted / drafted tokens
    tokens_per_target_forward: float | None = None  # speculative decoding: tokens per verify pass


@dataclass
class _Sequence:
    """Per-prompt bookkeeping while a batch is generated."""

    generated: list[int] = field(default_factory=list)
    text: str = ""  # the text shown so far
    added: str = ""  # what the latest token added to it
    finish_reason: str | None = None


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
        config = self.model.config.get_text_config()
        self.context_length = getattr(config, "max_position_embeddings", None)
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids, default=0)
        self.fast_decoder = None  # the GPU fast path's decoder (fast_decode.py), built on first use

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
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
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
        batch = [prompt] if isinstance(prompt, str) else list(prompt)
        outputs = [_Collected() for _ in batch]
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
    ):
        """Yield a TokenStep for every step: tokenize, prefill, then each decode step.

        speculative: None, "draft" (with draft= a TextGenerationPipeline or model sharing the
        tokenizer), "prompt-lookup" (n-grams of the context) or "self" (the target's first
        layers; draft= the number of layers, default a quarter). Stop between steps by closing
        the generator or setting stop_event; the KV cache is freed either way.
        fast_path: a static KV cache and a CUDA-graph decode step (fast_decode.py), same events;
        None: on for CUDA where the model and request allow it, True: on (eager on the CPU), False: off.
        """
        settings = SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._check_request(prompts, max_new_tokens, top_logprobs, num_draft_tokens, speculative, use_cache)
        from .fast_decode import fast_generate, wants_fast_path

        fast = wants_fast_path(self, fast_path, use_cache, speculative)

        self._sync_precision()
        # 1. tokenize once: the prompt becomes token ids, left-padded into one batch
        timer = StepTimer(self.device)
        with timer.time() as timing:
            input_ids, attention_mask = self._tokenize(prompts, chat)
        context = self.context_length
        if context is not None and input_ids.shape[1] + max_new_tokens > context:
            raise ValueError(
                f"the prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {context} tokens; shorten the prompt or lower max_new_tokens"
            )
        for i in range(len(prompts)):
            ids = input_ids[i][attention_mask[i].bool()].tolist()
            yield TokenStep(
                phase="tokenize", index=0, sequence=i, timing=timing, token_ids=ids,
                tokens=self.tokenizer.convert_ids_to_tokens(ids), shapes={"token_ids": (1, len(ids))},
            )

        if speculative is not None:
            from .speculative import speculative_stream

            yield from speculative_stream(
                self, input_ids, settings, max_new_tokens, top_logprobs, stops, speculative, draft,
                num_draft_tokens, stop_event,
            )
            return
        if fast:
            yield from fast_generate(self, input_ids, attention_mask, settings, max_new_tokens, top_logprobs, stops, stop_event)
            return
        yield from self._generate(
            input_ids, attention_mask, settings, max_new_tokens, top_logprobs, stops, use_cache, stop_event
        )

    # -----------------------------------------------------------------------------------------
    # The loop

    def _generate(self, input_ids, attention_mask, settings, max_new_tokens, top_logprobs, stops, use_cache, stop_event):
        processors = settings.processors()
        generator = torch.Generator(self.device).manual_seed(settings.seed)
        sequences = [_Sequence() for _ in range(input_ids.shape[0])]
        kv_cache = DynamicCache(config=self.model.config) if use_cache else None
        timer = StepTimer(self.device)
        try:
            # 2. prefill: the whole prompt in one forward pass; its last position predicts token 0
            with timer.time() as timing:
                logits, hidden_shapes = self.prefill(input_ids, attention_mask, kv_cache)
                scores = processors(input_ids, logits)
                next_tokens = choose_token(scores, settings, generator)
            phase, q_len = "prefill", input_ids.shape[1]
            for index in range(max_new_tokens):
                kv_len = input_ids.shape[1]
                flops, bytes_moved = decoder_step_cost(self.shape, input_ids.shape[0], q_len, kv_len)
                events = self._step_events(
                    phase, index, timing, logits, scores, next_tokens, sequences, top_logprobs, stops,
                    max_new_tokens, kv_cache, flops, bytes_moved, hidden_shapes,
                )
                yield from events
                if all(s.finish_reason for s in sequences) or (stop_event is not None and stop_event.is_set()):
                    return
                # finished sequences keep receiving padding, as in generate(), so the batch stays square
                done = torch.tensor([s.finish_reason is not None for s in sequences], device=self.device)
                next_tokens = next_tokens.masked_fill(done, self.pad_token_id)
                input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=1)
                attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)[:, None]], dim=1)

                # 3. decode: one token in (or, without a cache, the whole sequence again), one out
                with timer.time() as timing:
                    logits, hidden_shapes = self.decode_step(input_ids, attention_mask, kv_cache)
                    scores = processors(input_ids, logits)
                    next_tokens = choose_token(scores, settings, generator)
                phase, q_len = "decode", 1 if use_cache else input_ids.shape[1]
        finally:
            # stopped, finished or failed: drop the cache now rather than when the generator is collected
            del kv_cache
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def prefill(self, input_ids, attention_mask, kv_cache):
        """The prompt in one forward pass: fills the KV cache, returns the last position's logits."""
        logits, shapes = self.forward(input_ids, attention_mask, kv_cache)
        return logits[:, -1], shapes

    def decode_step(self, input_ids, attention_mask, kv_cache):
        """One new token: with a cache only the newest token runs (its K and V join the cache); without
        one, the whole sequence runs again and every earlier K and V is recomputed."""
        new_ids = input_ids[:, -1:] if kv_cache is not None else input_ids
        logits, shapes = self.forward(new_ids, attention_mask, kv_cache)
        return logits[:, -1], shapes

    def forward(self, new_ids, attention_mask, kv_cache, logits_to_keep: int = 1):
        """The model over `new_ids` (the tokens the cache has not seen): float32 logits of the last
        `logits_to_keep` positions [batch, keep, vocab], and the shapes along the highway."""
        # left padding shifts each prompt: positions count real tokens only, as generate() does
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, -new_ids.shape[1] :]
        # the backend scope is entered around each model call, never held across a yield: a
        # generator may be resumed from another thread, where a held context would not apply
        with torch.no_grad(), backends.use(attention=self.attention):
            out = self.model(
                input_ids=new_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=kv_cache,
                use_cache=kv_cache is not None, logits_to_keep=logits_to_keep, output_hidden_states=True,
            )
        shapes = {"token_ids": tuple(new_ids.shape), "embeddings": tuple(out.hidden_states[0].shape)}
        for i, hidden in enumerate(out.hidden_states[1:]):
            shapes[f"block {i}"] = tuple(hidden.shape)
        shapes["logits"] = tuple(out.logits.shape)
        return out.logits.float(), shapes

    def _step_events(
        self, phase, index, timing, logits, scores, next_tokens, sequences, top_logprobs, stops, max_new_tokens,
        kv_cache, flops, bytes_moved, shapes,
    ):
        """Turn one step's tensors into one event per unfinished sequence (host work, after timing)."""
        events = []
        for i, sequence in enumerate(sequences):
            if not sequence.finish_reason:
                token = int(next_tokens[i])
                self._advance(sequence, token, stops, max_new_tokens)
                events.append(
                    self.token_event(
                        phase, index, timing, token, logits[i], scores[i], sequence, top_logprobs, kv_cache,
                        sequence=i, flops=flops, bytes=bytes_moved, shapes=shapes,
                    )
                )
        return events

    def token_event(self, phase, index, timing, token, logits, scores, state, top_logprobs, kv_cache, **fields):
        """The event for one chosen token, from its step's raw logits and processed scores [vocab]."""
        log_probs = torch.log_softmax(logits, dim=-1)
        return TokenStep(
            phase=phase, index=index, timing=timing, token_id=token, text=state.added,
            logprob=float(log_probs[token]), top=top_alternatives(log_probs.exp(), top_logprobs, self.tokenizer),
            top_processed=top_alternatives(torch.softmax(scores, dim=-1), top_logprobs, self.tokenizer),
            kv_cache_bytes=kv_cache_bytes(kv_cache), finish_reason=state.finish_reason, **fields,
        )

    def _advance(self, sequence, token, stops, max_new_tokens) -> str | None:
        """Append a token to a sequence, decide whether it finished, and set the text it adds.

        Text that could be the start of a stop string, or an incomplete UTF-8 character, is held
        back until the next token settles it: a stream cannot take back what it has shown."""
        sequence.generated.append(token)
        text, stopped = self.decode(sequence.generated, stops)
        finish = None
        if token in self.eos_token_ids:
            finish = "eos"
        elif stopped:
            finish = "stop"
        elif len(sequence.generated) >= max_new_tokens:
            finish = "length"
        if finish is None:
            held = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
            text = text[: len(text) - held]
            text = text.rstrip("\ufffd")
        sequence.added = text[len(sequence.text) :]
        sequence.text = text if len(text) > len(sequence.text) else sequence.text
        sequence.finish_reason = finish
        return finish

    def decode(self, token_ids: list[int], stops: list[str]) -> tuple[str, bool]:
        """The text of generated tokens, cut before the first stop string; and whether one was found."""
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        found = [text.find(s) for s in stops if s in text]
        return (text[: min(found)], True) if found else (text, False)

    def _sync_precision(self):
        """Apply the precision chosen for this call (backends.use() scope, else the pipeline's)."""
        wanted = backends.current().precision or self.precision
        if wanted != backends.precision_of(self.model):
            if wanted is None:
                backends.restore_precision(self.model)
            else:
                backends.apply_precision(self.model, wanted)

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

    def _check_request(self, prompts, max_new_tokens, top_logprobs, num_draft_tokens, speculative, use_cache):
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty; type some text to continue")
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


def kv_cache_bytes(kv_cache) -> int:
    """Bytes held by the cache's key and value tensors, as allocated."""
    if kv_cache is None:
        return 0
    total = 0
    for layer in kv_cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class _Collected:
    """Gathers one sequence's events into a GenerationOutput."""

    def __init__(self):
        self.steps, self.token_ids, self.finish_reason = [], [], None

    def add(self, event: TokenStep):
        self.steps.append(event)
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            self.finish_reason = event.finish_reason or self.finish_reason

    def output(self, text: str) -> GenerationOutput:
        out = GenerationOutput(text, self.token_ids, self.steps, self.finish_reason or "stopped")
        drafted = [e.drafted for e in self.steps if e.drafted is not None]
        if drafted:
            accepted = sum(1 for e in self.steps if e.from_draft)
            out.acceptance_rate = accepted / max(1, sum(len(d) for d in drafted))
            out.tokens_per_target_forward = len(self.token_ids[1:]) / len(drafted)  # token 0 came from prefill
        return out
