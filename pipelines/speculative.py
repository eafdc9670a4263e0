"""Speculative decoding: a cheap draft guesses several tokens, the big model checks them in one pass.

Decode is memory-bound: reading the weights for one token costs about as much as for five. So a
draft proposes k tokens, the target runs once over all of them (q_len = k + 1) and keeps the
longest prefix it agrees with, plus one token of its own. Every round yields at least one token
and at most k + 1, for one target forward.

It is lossless. Greedy: a draft token is kept only if it is the target's argmax, so the output is
plain greedy decoding's. Sampling: draft token x (drawn from the draft's q) is kept with
probability min(1, p(x) / q(x)); on rejection the target's token is drawn from
normalise(max(0, p - q)). This accept/resample rule (Leviathan et al. 2023; Chen et al. 2023)
leaves every emitted token distributed exactly as the target's p.

Three drafts:
    draft          another model that shares the tokenizer (e.g. a smaller one of the same family)
    prompt-lookup  no model at all: the tokens that followed the last occurrence of the current
                   n-gram earlier in the context (q is then one-hot on the guess)
    self           the target's own first layers with its final norm and head: a shallow copy
                   sharing the weights, no extra memory

Depends on torch, transformers, the studio core and pipelines.generation / sampling.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from studio import backends
from studio.cost import decoder_step_cost
from studio.profiling import StepTimer

from .generation import SequenceState, cache_keyword, kv_cache_bytes
from .sampling import choose_token, top_tokens


class PromptLookupDraft:
    """Guess the continuation by finding the current n-gram earlier in the context."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, ids: list[int], k: int, processors, settings, generator) -> tuple[list[int], None]:
        for n in range(min(self.max_ngram, len(ids) - 1), 0, -1):
            tail = ids[-n:]
            # the latest earlier occurrence is the likeliest to repeat
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + k], None
        return [], None

    def rewind(self, keep: int) -> None:
        pass


class ModelDraft:
    """Guess k tokens with a smaller model decoding on its own KV cache."""

    def __init__(self, model, attention: str | None):
        self.model = model
        self.attention = attention
        self.kv_cache = DynamicCache(config=model.config)
        self.cache_keyword = cache_keyword(model)

    def propose(self, ids: list[int], k: int, processors, settings, generator) -> tuple[list[int], torch.Tensor]:
        device = next(self.model.parameters()).device
        sequence = torch.tensor([ids], device=device)
        drafted, q_probs = [], []
        with torch.no_grad(), backends.use(attention=self.attention):
            for _ in range(k):
                # feed what the draft's cache has not seen yet: the whole prompt at first, then 1-2 tokens
                new = sequence[:, self.kv_cache.get_seq_length() :]
                cache = {self.cache_keyword: self.kv_cache}
                logits = self.model(input_ids=new, **cache, use_cache=True, logits_to_keep=1).logits
                scores = processors(sequence, logits[:, -1, :].float())
                token = choose_token(scores, settings, generator)
                q_probs.append(torch.softmax(scores, dim=-1)[0])
                drafted.append(int(token))
                sequence = torch.cat([sequence, token[:, None]], dim=1)
        return drafted, torch.stack(q_probs)

    def rewind(self, keep: int) -> None:
        """Forget cached positions from `keep` on: drafts the target rejected."""
        excess = self.kv_cache.get_seq_length() - keep
        if excess > 0:
            self.kv_cache.crop(-excess)


def self_draft_model(model, num_layers: int):
    """The target's first `num_layers` decoder layers, its final norm and head, as a model of its own.

    A shallow copy along the path from the root to the list of decoder layers: the copies share
    every weight with the target; only the list (and the config saying how long it is) differ.
    """
    config = model.config.get_text_config()
    total = config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"a self-draft needs between 1 and {total - 1} of the model's {total} layers; got {num_layers}")
    path = _path_to_decoder_layers(model, total)
    draft_config = copy.deepcopy(config)
    draft_config.num_hidden_layers = num_layers
    if getattr(draft_config, "layer_types", None):
        draft_config.layer_types = draft_config.layer_types[:num_layers]
    root = copy.copy(model)
    root._modules = dict(model._modules)
    parent = root
    for name in path[:-1]:
        child = copy.copy(parent._modules[name])
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[path[-1]] = torch.nn.ModuleList(list(parent._modules[path[-1]])[:num_layers])
    for module in (root, *_modules_along(root, path[:-1])):
        if hasattr(module, "config"):
            module.config = draft_config
    return root


def _path_to_decoder_layers(model, total):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == total:
            return name.split(".")
    raise ValueError(f"could not find the {total} decoder layers of {type(model).__name__} to build a self-draft")


def _modules_along(root, path):
    module = root
    for name in path:
        module = module._modules[name]
        yield module


def speculative_generate(pipeline, input_ids, attention_mask, request, *, mode, draft, k):
    """Prefill as usual, then draft-and-verify rounds; yields TokenSteps like the plain loop."""
    device, settings = pipeline.device, request.settings
    processors = settings.processors()
    generator = torch.Generator(device).manual_seed(settings.seed)
    drafter = _make_drafter(pipeline, mode, draft, request.attention)
    kv_cache = DynamicCache(config=pipeline.model.config)
    timer = StepTimer(device)
    sequence = SequenceState(0, request, pipeline.tokenizer)
    ids = input_ids[0].tolist()
    try:
        # prefill: the target reads the prompt and picks the first token itself
        with timer.time() as timing:
            logits, shapes = pipeline.prefill(input_ids, attention_mask, kv_cache, request)
            scores = processors(input_ids, logits)
            token = int(choose_token(scores, settings, generator))
        flops, bytes_moved = decoder_step_cost(pipeline.shape, 1, len(ids), len(ids))
        sequence.advance(token)
        logprob, top, top_processed = top_tokens(logits[0], scores[0], token, request.top_logprobs)
        yield sequence.event(
            "prefill", 0, timing, logprob=logprob, top=top, top_processed=top_processed,
            kv_cache_bytes=kv_cache_bytes(kv_cache), flops=flops, bytes=bytes_moved, shapes=shapes,
        )
        ids.append(token)
        index = 1
        while not sequence.finished and not request.cancelled:
            # the target's cache holds every token but the last; the draft guesses what follows it
            with timer.time() as timing:
                budget = min(k, request.max_new_tokens - len(sequence.generated) - 1)
                drafted, q_probs = drafter.propose(ids, budget, processors, settings, generator) if budget else ([], None)
                context = torch.tensor([ids + drafted], device=device)
                # one target forward over the last token and every draft: k + 1 predictions at once
                logits, shapes = pipeline.forward(
                    context[:, len(ids) - 1 :], torch.ones_like(context), kv_cache, request,
                    logits_to_keep=len(drafted) + 1,
                )
                logits = logits[0]
                # position j's scores see the sequence up to draft j, as the plain loop's would
                scores = torch.cat(
                    [processors(context[:, : len(ids) + j], logits[j : j + 1]) for j in range(len(drafted) + 1)]
                )
                accepted, correction = _verify(drafted, q_probs, scores, settings, generator)
                # the cache now holds every verified input; drop the K/V of rejected drafts
                if accepted < len(drafted):
                    kv_cache.crop(-(len(drafted) - accepted))
                drafter.rewind(len(ids) + accepted)
            flops, bytes_moved = decoder_step_cost(pipeline.shape, 1, len(drafted) + 1, len(ids) + len(drafted))
            emitted = drafted[:accepted] + [correction]
            for j, token in enumerate(emitted):
                sequence.advance(token)
                first, last = j == 0, j == len(emitted) - 1 or sequence.finished
                logprob, top, top_processed = top_tokens(logits[j], scores[j], token, request.top_logprobs)
                # the round is timed and counted once, on its first token
                yield sequence.event(
                    "decode", index, timing if first else None, logprob=logprob, top=top, top_processed=top_processed,
                    kv_cache_bytes=kv_cache_bytes(kv_cache), flops=flops if first else None,
                    bytes=bytes_moved if first else None, shapes=shapes if first else {},
                    drafted=drafted if first else None, from_draft=j < accepted,
                    rejected=drafted[accepted:] if last else None,
                )
                ids.append(token)
                index += 1
                if sequence.finished:
                    break
    finally:
        del kv_cache
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _verify(drafted, q_probs, scores, settings, generator) -> tuple[int, int]:
    """How many drafts the target accepts, and the token it adds after them."""
    if settings.greedy:
        target = scores.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(drafted) and drafted[accepted] == target[accepted]:
            accepted += 1
        return accepted, target[accepted]
    p = torch.softmax(scores, dim=-1)
    for j, token in enumerate(drafted):
        q = q_probs[j] if q_probs is not None else torch.nn.functional.one_hot(torch.tensor(token), p.shape[-1]).to(p)
        u = torch.rand((), generator=generator, device=p.device)
        if u < torch.clamp(p[j, token] / q[token], max=1.0):
            continue
        residual = torch.clamp(p[j] - q, min=0)  # rejected: resample where the target wants more than the draft
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


def _make_drafter(pipeline, mode, draft, attention):
    if mode == "prompt-lookup":
        return PromptLookupDraft()
    if mode == "self":
        layers = draft if draft is not None else max(1, pipeline.shape.layers // 4)
        return ModelDraft(self_draft_model(pipeline.model, layers), attention)
    model = getattr(draft, "model", draft)
    if model is None:
        raise ValueError("speculative='draft' needs draft= a TextGenerationPipeline or a causal LM sharing the tokenizer")
    vocab = model.get_output_embeddings().weight.shape[0]
    if getattr(draft, "tokenizer", None) is not None and draft.tokenizer.get_vocab() != pipeline.tokenizer.get_vocab():
        raise ValueError("the draft model's tokenizer differs from the target's; speculative decoding needs the same vocabulary")
    if vocab != pipeline.shape.vocab:
        raise ValueError(f"the draft's vocabulary ({vocab}) differs from the target's ({pipeline.shape.vocab})")
    return ModelDraft(model, attention)
