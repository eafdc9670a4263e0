"""The attention table of `studio bench`: every attention kernel on one long causal sequence, its
time, TFLOP/s and peak memory, so that the eager kernel's S x S score matrix shows next to the
kernels that never build it.

Depends on torch, studio.backends and studio.bench.measure / .results; never imports another lane
of the bench, the goals, the report, a pipeline or the UI.
"""

from __future__ import annotations

from time import perf_counter

import torch

from studio import backends
from studio.bench.measure import ROTATIONS, PeakMemory, measure_rotating, synchronize
from studio.bench.results import Results, Settings, dtype_name, matmul_peak, or_failed, table_row


class AttentionBench:
    """Every kernel, built in or registered by a plugin, on one causal self-attention: B=1, H=16,
    D=64, S=4,096 fp16 on a GPU (as in ANCHORS) or S=1,024 fp32 on the CPU. The eager kernel's
    [B, H, S, S] score matrix shows in its peak memory; the flash, memory-efficient, SDPA and
    tiled kernels never build it."""

    BATCH, HEADS, HEAD_DIM = 1, 16, 64

    def __init__(self, settings: Settings, results: Results):
        self.settings, self.results = settings, results
        self.device = results.device
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32

    def tasks(self):
        return [(f"attention {name}", lambda name=name: self.run(name)) for name in self.kernels()]

    def kernels(self) -> list[str]:
        return backends.attention_names()  # the registered kernels (plugins) next to the built-ins

    def run(self, name: str, seq: int | None = None, repeats: int | None = None, warmup: int | None = None) -> dict:
        s = self.settings
        seq = seq or s.attention_seq
        b, h, d = self.BATCH, self.HEADS, self.HEAD_DIM
        elem = torch.finfo(self.dtype).bits // 8
        base = dict(kernel=name, batch=b, heads=h, seq=seq, head_dim=d, causal=True, dtype=dtype_name(self.dtype),
                    scores_bytes=b * h * seq * seq * elem, materialises_scores=name in ("eager", "sdpa-math"))
        info = backends.attention_info(name, self.device, self.dtype)
        reason = info.reason
        if reason is None and s.attention_kernels and name not in s.attention_kernels:
            reason = "not asked for (--attention)"
        if reason is None and s.quick and name == "flex" and self.device.type == "cpu":
            reason = "--quick: FlexAttention compiles each new shape with inductor (tens of seconds on a CPU)"
        if reason is not None:
            return self.results.add("attention", table_row("attention", status="skipped", reason=reason, **base))
        return or_failed(self.results, "attention", base, self._run, name, seq, repeats, warmup, base)

    def _run(self, name, seq, repeats, warmup, base) -> dict:
        s = self.settings
        b, h, d = self.BATCH, self.HEADS, self.HEAD_DIM
        generator = torch.Generator(self.device).manual_seed(0)
        inputs = [
            tuple(torch.randn(b, h, seq, d, device=self.device, dtype=self.dtype, generator=generator) for _ in range(3))
            for _ in range(ROTATIONS)
        ]
        resolved = backends.choose_attention(*inputs[0], causal=True).name if name == "auto" else name
        base["materialises_scores"] = resolved in ("eager", "sdpa-math")

        def call(q, k, v):
            return backends.attention(q, k, v, causal=True, backend=name)

        started = perf_counter()
        call(*inputs[0])  # the first call compiles (flex) or picks a kernel: warm-up, timed apart
        synchronize(self.device)
        warmup_ms = (perf_counter() - started) * 1e3
        with PeakMemory(self.device) as memory:
            m = measure_rotating(call, inputs, self.device, warmup if warmup is not None else max(0, s.warmup - 1),
                                 repeats or s.attention_repeats)
        # causal: query i sees i + 1 keys; Q·Kᵀ and P·V are 2 FLOPs per multiply-add each
        flops = 4 * b * h * d * seq * (seq + 1) // 2
        return self.results.add("attention", table_row(
            "attention", status="ok", resolved=resolved, repeats=len(m.all_ms), warmup_ms=warmup_ms, ms=m.median_ms,
            ms_min=m.min_ms, ms_max=m.max_ms, tflop_s=flops / m.median_ms / 1e9,
            share_of_peak=flops / (m.median_ms / 1e3) / matmul_peak(self.results.ceilings, dtype_name(self.dtype)),
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))
