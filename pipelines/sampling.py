"""From logits to the next token: the sampling settings, transformers' logits processors, and the
choice itself (greedy or sampled).

The model only ever predicts a probability for every token in the vocabulary; everything here
reshapes that distribution (repetition penalty, temperature, top-k, top-p, min-p) and picks one
token. The processors are transformers' own, in the order `generate()` applies them, so our loop
and the stock one agree.

Depends on torch, transformers and studio.values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from studio.values import is_integer, is_real


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0  # 0 = greedy: always the most likely token
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int = 0

    def __post_init__(self):
        # numbers must be numbers: a string, a boolean or NaN slips through comparisons or breaks them
        def real(value) -> bool:
            return is_real(value) and math.isfinite(value)

        if not real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature!r}")
        if self.top_k is not None and (not is_integer(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None; got {self.top_k!r}")
        if self.top_p is not None and not (real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if self.min_p is not None and not (real(self.min_p) and 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be in [0, 1]; got {self.min_p!r}")
        if self.repetition_penalty is not None and not (real(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = none); got {self.repetition_penalty!r}")
        if not is_integer(self.seed) or not (0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63); got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processors(self) -> LogitsProcessorList:
        """transformers' processors for these settings, in generate()'s order."""
        processors = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.greedy:
            return processors  # the warpers below only reshape what sampling draws from
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k is not None:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        if self.min_p is not None and self.min_p > 0:
            processors.append(MinPLogitsWarper(self.min_p))
        return processors


def choose_token(scores: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None) -> torch.Tensor:
    """[batch, vocab] processed scores -> [batch] token ids: argmax, or one draw from the softmax."""
    if settings.greedy:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.float(), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def top_tokens(logits: torch.Tensor, scores: torch.Tensor, token: int, n: int):
    """For one step's raw logits and processed scores [vocab]: the chosen token's log-probability
    under the raw distribution, and (ids, probs) of the n most likely tokens of each distribution."""
    log_probs = torch.log_softmax(logits, dim=-1)
    raw = log_probs.exp().topk(min(n, logits.shape[-1]))
    processed = torch.softmax(scores, dim=-1).topk(min(n, scores.shape[-1]))
    return (float(log_probs[token]), (raw.indices.tolist(), raw.values.tolist()),
            (processed.indices.tolist(), processed.values.tolist()))
