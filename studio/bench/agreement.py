"""How far a matmul precision moves an LLM's output from its own dtype's, measured teacher-forced.

    agreement(llm, "Once upon a time", new_tokens=256, precision="int8")
    # {"top1_agreement": 0.98, "max_logit_difference": 0.41, "positions": 256, ...}

The model's own greedy continuation is generated first; then the whole sequence goes through
the model once in its own dtype and once in `precision`, and at every generated position the
two argmaxes are compared. Teacher forcing matters: compared as free-running text, one early
disagreement would make every later token differ, and the figure would measure luck.

Depends on torch and the studio's backends; the pipeline is passed in. Never imports the UI.
"""

from __future__ import annotations

import torch

from studio import backends


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
