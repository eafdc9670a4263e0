"""The prefill table of `studio bench`: one long prompt through an LLM.

    prefill_rows(bench)       one forward over prefill_tokens random tokens, filling a fresh KV
                              cache, per attention kernel and precision: device time, TFLOP/s and
                              share of the matmul peak
    first_token_rows(bench)   the time to first token of a prompt of prefill_tokens tokens
                              (max_new_tokens=1), the same prompts for every path: transformers'
                              generate() first (the reference), the lane's stream on the fast path
                              and on the plain loop, llama.cpp on the same GGUF file

Time to first token is wall clock around the whole call, tokenizing included, as in the LLM
table; for the lane, `ms` is its prefill event's time and `ttft_ms` the wall clock, for the others
both are the wall clock. `speedup_vs_stock` compares wall clock with wall clock.

`bench` is the model's LLMBench (studio.bench.llm), passed in: this module reads its loaded
pipeline, prompts and timed calls, and never imports it. Depends on torch, studio.backends,
studio.cost and studio.bench.measure / .results; imports transformers inside a function. Never
imports another lane of the bench, the goals, the report or the UI.
"""

from __future__ import annotations

import contextlib
import statistics
from time import perf_counter

import torch

from studio import backends
from studio.bench.measure import ROTATIONS, PeakMemory, measure_rotating, median_spread, synchronize
from studio.bench.results import (
    TILED_MAX_BLOCK_PAIRS,
    attention_grid,
    dtype_name,
    first_line,
    matmul_peak,
    peak_key,
    precision_grid,
    table_row,
)
from studio.cost import decoder_step_cost

QUICK_PREFILL = ("auto", "eager")  # the kernels --quick runs the long prefill with
STOCK = "transformers generate()"
FAST, PLAIN, LLAMACPP = "studio stream (fast path)", "studio stream (plain loop)", "llama.cpp"


def prefill_rows(bench) -> None:
    """One forward over prefill_tokens tokens (filling a fresh KV cache), per attention kernel and
    precision: TFLOP/s and share of the matmul peak. Device time from CUDA events."""
    s, device = bench.settings, bench.device
    dtype = bench._dtype()
    variants = [(k, None, r) for k, r in attention_grid(s, device, dtype, "prefill")]
    variants += [("auto", p, r) for p, r in precision_grid(s, device, dtype) if p is not None]
    if s.quick:  # the default kernel, and eager for its score matrix
        variants = [(k, p, r if r or (k in QUICK_PREFILL and p is None) else
                     f"--quick runs the prefill with {' and '.join(QUICK_PREFILL)} only; run without --quick")
                    for k, p, r in variants]
    for kernel, precision, reason in variants:
        base = dict(model=bench.model_name, arch=getattr(bench, "arch", None), path="studio (prefill forward)",
                    attention=kernel, precision=precision or "native", dtype=dtype_name(dtype),
                    weights=precision or dtype_name(dtype), tokens=s.prefill_tokens)
        if bench._not_loaded("prefill", base):
            continue
        context = bench.llm.context_length
        if reason is None and context and s.prefill_tokens > context:
            reason = f"the model's context is {context} tokens"
        if reason is None and kernel == "tiled" and (s.prefill_tokens // 64) ** 2 // 2 > TILED_MAX_BLOCK_PAIRS:
            reason = (f"the tiled kernel is a Python loop over 64x64 blocks: {(s.prefill_tokens // 64) ** 2 // 2:,} "
                      "block pairs per layer; see the attention table for it")
        if reason is not None:
            bench.results.add("prefill", table_row("prefill", status="skipped", reason=reason, **base))
            continue
        try:
            _prefill_row(bench, kernel, precision, base)
        except Exception as error:
            bench.results.add("prefill", table_row("prefill", status="failed", reason=first_line(error), **base))


def _prefill_row(bench, kernel, precision, base):
    from transformers import DynamicCache

    from pipelines.generation import GenerationRequest
    from pipelines.sampling import SamplingSettings

    s, llm, device = bench.settings, bench.llm, bench.device
    request = GenerationRequest(SamplingSettings(), 1, 0, (), frozenset(), attention=kernel)
    vocab = min(llm.shape.vocab, len(llm.tokenizer))
    generator = torch.Generator().manual_seed(0)
    inputs = [(torch.randint(0, vocab, (1, s.prefill_tokens), generator=generator).to(device),)
              for _ in range(ROTATIONS)]

    def prefill(ids):
        cache = DynamicCache(config=llm.model.config)
        llm.prefill(ids, torch.ones_like(ids), cache, request)

    if precision:
        backends.apply_precision(llm.model, precision)
    try:
        with backends.use(attention=kernel):
            started = perf_counter()
            prefill(*inputs[0])
            synchronize(device)
            warmup_ms = (perf_counter() - started) * 1e3
            with PeakMemory(device) as memory:
                m = measure_rotating(prefill, inputs, device, max(0, s.warmup - 1), s.repeats)
    finally:
        backends.restore_precision(llm.model)
    flops, _ = decoder_step_cost(llm.shape, 1, s.prefill_tokens, s.prefill_tokens)
    dtype = peak_key(precision, bench._dtype())
    bench.results.add("prefill", table_row(
        "prefill", status="ok", repeats=len(m.all_ms), warmup_ms=warmup_ms, ms=m.median_ms, ms_min=m.min_ms,
        ms_max=m.max_ms, tok_s=s.prefill_tokens / m.median_ms * 1e3, tflop_s=flops / m.median_ms / 1e9,
        share_of_peak=flops / (m.median_ms / 1e3) / matmul_peak(bench.results.ceilings, dtype),
        scores_bytes=llm.shape.heads * s.prefill_tokens**2 * 4 if kernel in ("eager", "sdpa-math") else 0,
        peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
    ))


def first_token_rows(bench) -> None:
    """Time to first token of prompts of prefill_tokens tokens, one row per path (see the module's
    docstring); each path after generate() with its speed-up over it."""
    s = bench.settings
    stock_ttft = None
    for path in (STOCK, FAST, PLAIN, LLAMACPP):
        own = dtype_name(bench._dtype())
        base = dict(model=bench.model_name, arch=getattr(bench, "arch", None), path=path,
                    attention={STOCK: "sdpa", LLAMACPP: "llama.cpp"}.get(path, "auto"), precision="native",
                    dtype=own, weights=own, tokens=s.prefill_tokens)
        if bench._not_loaded("prefill", base):
            continue
        reason = _first_token_reason(bench, path)
        if reason:
            bench.results.add("prefill", table_row("prefill", status="skipped", reason=reason, **base))
            continue
        try:
            row = _first_token_row(bench, path, base)
        except Exception as error:
            bench.results.add("prefill", table_row("prefill", status="failed", reason=first_line(error), **base))
            continue
        if path == STOCK:
            stock_ttft = row["ttft_ms"]
        elif stock_ttft:
            row["speedup_vs_stock"] = stock_ttft / row["ttft_ms"]


def _first_token_reason(bench, path: str) -> str | None:
    context = bench.llm.context_length
    if context and bench.settings.prefill_tokens + 1 > context:
        return f"the model's context is {context} tokens"
    if path == FAST:
        from pipelines.fast_decode import unsupported_reason

        reason = unsupported_reason(bench.llm.model)
        return f"the fast path: {reason}" if reason else None
    if path == LLAMACPP:
        return bench.llamacpp_reason()
    return None


def _first_token_row(bench, path: str, base: dict) -> dict:
    s, llm = bench.settings, bench.llm
    prompts = bench.prompts(s.prefill_tokens)
    if path == STOCK:
        scope, run = bench.stock_model(), lambda prompt: bench.stock_generate(prompt, new_tokens=1)
    elif path == LLAMACPP:
        runner = bench.llamacpp_runner()
        base.update(precision=runner.quantization, weights=runner.quantization)
        scope, run = contextlib.nullcontext(), lambda prompt: runner.generate(prompt, 1)
    else:
        # fast_path explicit, as in every row; the fast path's prefill is eager (nothing to compile)
        kwargs = dict(max_new_tokens=1, use_cache=True, top_logprobs=0, speculative=None, draft=None,
                      fast_path=path == FAST)
        llm.fast_path_error = None
        scope, run = backends.use(attention="auto", precision=None), lambda prompt: bench.generate(prompt, kwargs)
    with scope:
        started = perf_counter()
        for prompt in prompts[: s.warmup]:
            run(prompt)
        warmup_ms = (perf_counter() - started) * 1e3
        with PeakMemory(bench.device) as memory:
            runs = [run(prompt) for prompt in prompts[s.warmup:]]
    if path == FAST:
        if llm.fast_path_error:
            raise RuntimeError(f"the fast path fell back to the plain loop: {llm.fast_path_error}")
        base["weights"] = llm.fast_decoder.weights or dtype_name(llm.fast_decoder.dtype)
    ttft = [r["ttft_ms"] for r in runs]
    ms, ms_min, ms_max = median_spread([r["prefill_ms"] for r in runs] if path in (FAST, PLAIN) else ttft)
    tokens = runs[0]["prompt_len"]
    flops, _ = decoder_step_cost(llm.shape, 1, tokens, tokens)
    peak = matmul_peak(bench.results.ceilings, peak_key(base["weights"], bench._dtype()))
    return bench.results.add("prefill", table_row(
        "prefill", status="ok", repeats=len(runs), warmup_ms=warmup_ms, ms=ms, ms_min=ms_min, ms_max=ms_max,
        ttft_ms=statistics.median(ttft), tok_s=tokens / ms * 1e3, tflop_s=flops / ms / 1e9,
        share_of_peak=flops / (ms / 1e3) / peak, peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth,
        **dict(base, tokens=tokens),
    ))
