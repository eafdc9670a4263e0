"""How far a matmul precision moves an LLM's output from its own dtype's, measured teacher-forced.

    agreement(llm, "Once upon a time", new_tokens=256, precision="int8")
    # {"top1_agreement": 0.98, "max_logit_difference": 0.41, "positions": 256, ...}

The model's own greedy continuation is generated first; then the whole sequence goes through
the model once in its own dtype and once in `precision`, and at every generated position the
two argmaxes are compared. Teacher forcing matters: compared as free-running text, one early
disagreement would make every later token differ, and the figure would measure luck.

`agreement_rows` fills the bench's agreement table with it: bf16, int8 and fp16 (those the device
has, other than the model's own dtype) over `Settings.agreement_tokens` positions.

Depends on torch, the studio's backends and studio.bench.results (the table's rows); the pipeline
is passed in. Never imports a lane of the bench, the goals, the report or the UI.
"""

from __future__ import annotations

from time import perf_counter

import torch

from studio import backends
from studio.bench.results import Results, dtype_name, first_line, table_row

PRECISIONS = ("bf16", "int8", "fp16")  # each a forward over the sequence: cheap even where it is slow
PROMPT = "Once upon a time, in a small village by the sea,"  # natural text: a word salad would repeat itself


def agreement(llm, prompt: str, new_tokens: int = 256, precision: str = "int8") -> dict:
    """Top-1 agreement and the largest logit difference of `precision` against the model's own
    dtype over `new_tokens` greedy positions after `prompt`."""
    generated = llm(prompt, max_new_tokens=new_tokens, fast_path=False)  # any text will do: it is only fed back
    ids = torch.tensor([generated.steps[0].token_ids + generated.token_ids], device=llm.device)
    positions = slice(len(generated.steps[0].token_ids) - 1, ids.shape[1] - 1)  # each predicts the next token
    own = backends.precision_of(llm.model)
    try:
        backends.restore_precision(llm.model)
        reference = _logits(llm.model, ids)[positions]
        backends.apply_precision(llm.model, precision)
        converted = _logits(llm.model, ids)[positions]
    finally:
        backends.sync_precision([llm.model], own)
    same = reference.argmax(-1) == converted.argmax(-1)
    return {
        "precision": precision,
        "positions": int(same.numel()),
        "top1_agreement": same.float().mean().item(),
        "first_disagreement": int((~same).nonzero()[0]) if not same.all() else None,
        "max_logit_difference": (reference - converted).abs().max().item(),
    }


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0].float()


def agreement_rows(results: Results, llm, model_name: str, new_tokens: int, prompt: str = PROMPT) -> None:
    """One agreement row per precision in PRECISIONS against the model's own dtype; skipped (with
    the reason) where the device lacks it or it is the model's own dtype."""
    dtype = next(llm.model.parameters()).dtype
    own = dtype_name(dtype)
    for precision in PRECISIONS:
        base = dict(model=model_name, precision=precision, reference=own)
        info = backends.precision_info(precision, llm.device, dtype)
        reason = "the model's own dtype" if precision == own else None if info.available else info.reason
        if reason:
            results.add("agreement", table_row("agreement", status="skipped", reason=reason, **base))
            continue
        started = perf_counter()
        try:
            measured = agreement(llm, prompt, new_tokens, precision)
        except Exception as error:  # one precision that breaks is reported, the others still run
            results.add("agreement", table_row("agreement", status="failed", reason=first_line(error), **base))
            continue
        results.add("agreement", table_row(
            "agreement", status="ok", positions=measured["positions"], top1_agreement=measured["top1_agreement"],
            first_disagreement=measured["first_disagreement"], max_logit_difference=measured["max_logit_difference"],
            ms=(perf_counter() - started) * 1e3, **base,
        ))
