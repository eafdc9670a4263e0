"""What the LLM lane's loops share: the request, each sequence's state, and the events they yield.

    request = GenerationRequest(settings, max_new_tokens=16, top_logprobs=5, stops=("\\n",), ...)
    sequence = SequenceState(0, request, tokenizer)
    sequence.advance(token)                 # text so far, and whether it finished (eos, stop, length)
    yield sequence.event("decode", index, timing, logprob=..., top=..., top_processed=...)

The three loops (the plain one in text_generation.py, the fast path in fast_decode.py and
speculative decoding in speculative.py) each import this module and nothing of one another.

Depends on torch, studio.events and pipelines.sampling; never on a loop, a model or Gradio.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field

import torch

from studio.events import Step

from .sampling import SamplingSettings


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
    notice: str | None = None  # something the user should be told once, e.g. that the fast path fell back
    adapter: str | None = None  # the LoRA adapter that ran (None: the base model)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]  # the generated tokens (the prompt's are in steps[0].token_ids)
    steps: list[TokenStep]
    finish_reason: str
    acceptance_rate: float | None = None  # speculative decoding: accepted / drafted tokens
    tokens_per_target_forward: float | None = None  # speculative decoding: tokens per verify pass


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a loop needs to know about one call besides the prompt's token ids."""

    settings: SamplingSettings
    max_new_tokens: int
    top_logprobs: int
    stops: tuple[str, ...]
    eos_token_ids: frozenset[int]
    attention: str | None = None  # the attention kernel the run's model calls use (None: "auto")
    stop_event: threading.Event | None = None
    adapter: str | None = None  # the LoRA adapter the run's model calls add (None: the base model)

    @property
    def cancelled(self) -> bool:
        """Whether the caller asked to stop (checked between steps)."""
        return self.stop_event is not None and self.stop_event.is_set()


def decode_text(tokenizer, token_ids: list[int], stops) -> tuple[str, bool]:
    """The text of generated tokens, cut before the first stop string; and whether one was found."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    found = [text.find(s) for s in stops if s in text]
    return (text[: min(found)], True) if found else (text, False)


def alternatives(tokenizer, ids: list[int], probs: list[float]) -> list[tuple[str, int, float]]:
    """(text, id, probability) of each of a step's top tokens."""
    texts = tokenizer.batch_decode([[i] for i in ids]) if ids else []
    return list(zip(texts, ids, probs))


class SequenceState:
    """One prompt's progress: the tokens generated, the text shown, and why it finished."""

    def __init__(self, index: int, request: GenerationRequest, tokenizer):
        self.index = index  # its place in the batch
        self.request = request
        self.tokenizer = tokenizer
        self.generated: list[int] = []
        self.text = ""  # the text shown so far
        self.added = ""  # what the latest token added to it
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def advance(self, token: int) -> None:
        """Append a token, decide whether the sequence finished, and set the text it adds.

        Text that could be the start of a stop string, or an incomplete UTF-8 character, is held
        back until the next token settles it: a stream cannot take back what it has shown."""
        request = self.request
        self.generated.append(token)
        text, stopped = decode_text(self.tokenizer, self.generated, request.stops)
        if token in request.eos_token_ids:
            self.finish_reason = "eos"
        elif stopped:
            self.finish_reason = "stop"
        elif len(self.generated) >= request.max_new_tokens:
            self.finish_reason = "length"
        else:
            held = max([n for s in request.stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
            text = text[: len(text) - held].rstrip("\ufffd")
        self.added = text[len(self.text) :]
        self.text = text if len(text) > len(self.text) else self.text

    def event(self, phase: str, index: int, timing, *, logprob: float, top, top_processed, **fields) -> TokenStep:
        """The event for the token just advanced; `top` and `top_processed` are (ids, probs) of the
        raw and the processed distributions' most likely tokens."""
        return TokenStep(
            phase=phase, index=index, timing=timing, sequence=self.index, token_id=self.generated[-1],
            text=self.added, logprob=logprob, top=alternatives(self.tokenizer, *top),
            top_processed=alternatives(self.tokenizer, *top_processed), finish_reason=self.finish_reason,
            adapter=self.request.adapter, **fields,
        )


def all_finished(sequences: list[SequenceState], request: GenerationRequest) -> bool:
    """Whether a loop should stop: every sequence finished, or the caller asked to stop."""
    return all(s.finished for s in sequences) or request.cancelled


def cache_keyword(model) -> str:
    """The name a transformers model's forward takes its KV cache by: `cache` from transformers
    5.24 on (which warns about the older name), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_cache_bytes(kv_cache) -> int:
    """Bytes held by a transformers cache's key and value tensors, as allocated (None: no cache)."""
    if kv_cache is None:
        return 0
    total = 0
    for layer in kv_cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


class Collected:
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
