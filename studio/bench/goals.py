"""What the rows of a `studio bench` run add up to, once the lanes have run: the side-by-side table
(prefill, decode, a denoising step and a VAE decode on this device's roofline) and the goals of
the lane issues, each with the measured distance to it: the GPU goals (stated for an H100) and
the CPU goals of issue 13 (ratios of rows measured in the same CPU run: the lane against
llama.cpp and generate(), int8 and bf16 against fp32, precision agreement, time to first token,
the diffusion lane against stock diffusers).

Depends on studio.profiling and studio.bench.results; reads the lanes' rows only through
`Results`, so it never imports a lane of the bench, the report, a pipeline or the UI.
"""

from __future__ import annotations

from studio.bench.results import Results, table_row
from studio.profiling import roofline


def side_by_side(results: Results) -> None:
    """Prefill, decode, a denoising step and a VAE decode of the lanes' default rows, on this
    device's roofline. (The work of each comes from the rows' private _cost fields, dropped here.)"""
    for row in results.tables["llm"]:
        cost = row.pop("_cost", None)
        if cost and row["status"] == "ok":
            _place(results, "llm", "prefill", row["model"], "default (auto kernel, cache on)", row["dtype"],
                   *cost["prefill"], row["prefill_ms"])
            if row["decode_tok_s"]:
                _place(results, "llm", "decode", row["model"], "default (auto kernel, cache on)", row["dtype"],
                       *cost["decode"], 1e3 / row["decode_tok_s"])
    for row in results.tables["diffusion"]:
        cost = row.pop("_cost", None)
        if cost and row["status"] == "ok":
            _place(results, "diffusion", "denoise step", row["model"], "default (auto kernel, CFG batched)",
                   row["dtype"], *cost["denoise step"], row["step_ms"])
            _place(results, "diffusion", "vae decode", row["model"], "default", row["dtype"], *cost["vae decode"],
                   row["vae_decode_ms"])


def _place(results, lane, workload, model, variant, dtype, flops, nbytes, ms):
    if not ms or flops is None or nbytes is None:
        return
    point = roofline(flops, nbytes, ms, results.ceilings, dtype)
    results.add("side_by_side", table_row(
        "side_by_side", lane=lane, workload=workload, model=model, variant=variant, dtype=dtype, ms=ms, flops=flops,
        bytes=nbytes, intensity=point.intensity, ridge=point.ridge, bound=point.bound,
        tflop_s=point.achieved_flops / 1e12, gb_s=point.achieved_bandwidth / 1e9, share=point.share,
        predicted_ms=point.predicted_ms,
    ))


# The goals of the lane issues, stated for an H100 (shared/ANCHORS.md has what stock tools reach)
# and, for the CPU most users have, in issue 13: ratios measured in one CPU run.
GOALS = [
    dict(id="llama-decode", goal="Llama-3.2-1B-shaped decode, bf16: >= 75 % of the bandwidth roofline (about 900 tok/s on an H100)",
         arch="llama-3.2-1b", target=0.75, higher=True, unit="share"),
    dict(id="smollm-decode", goal="SmolLM2-135M-shaped decode: >= 1,500 tok/s", arch="smollm2-135m", target=1500,
         higher=True, unit="tok/s"),
    dict(id="llama-prefill", goal="Llama-3.2-1B prefill of 2,048 tokens: >= 60 % of the matmul peak",
         arch="llama-3.2-1b", target=0.60, higher=True, unit="share"),
    dict(id="sd-step", goal="SD-1.5 UNet 512², CFG, fp16: <= 7 ms per denoising step", arch="sd-1.5-unet", target=7.0,
         higher=False, unit="ms"),
    dict(id="dit-step", goal="DiT-XL/2 256², CFG, fp16: <= 5 ms per denoising step", arch="dit-xl-2-256", target=5.0,
         higher=False, unit="ms"),
    dict(id="vae-decode", goal="SD VAE decode 512²: <= 12 ms", arch="sd-1.5-unet", target=12.0, higher=False, unit="ms"),
    dict(id="events-overhead", goal="per-step events and previews: <= 10 % over the same loop without them",
         arch=None, target=0.10, higher=False, unit="overhead"),
    dict(id="llm-memory", goal="LLM decode peak memory <= 1.15 x (weights + KV cache)", arch=None, target=1.15,
         higher=False, unit="ratio"),
    dict(id="sd-memory", goal="SD-1.5 UNet peak memory <= the stock diffusers pipeline's peak", arch="sd-1.5-unet",
         target=1.0, higher=False, unit="ratio"),
    # the CPU (issue 13): same model, machine and threads for every path compared
    dict(id="cpu-vs-llamacpp", device="cpu", target=1.5, higher=True, unit="ratio",
         goal="CPU: LLM lane decode with every event on (top-5 alternatives) >= 1.5 x llama.cpp's tok/s"),
    dict(id="cpu-vs-generate", device="cpu", target=2.0, higher=True, unit="ratio",
         goal="CPU: LLM lane decode with every event on (top-5 alternatives) >= 2 x transformers generate()'s tok/s"),
    dict(id="cpu-int8", device="cpu", target=1.5, higher=True, unit="ratio",
         goal="CPU: int8 weights >= 1.5 x the lane's fp32 decode tok/s"),
    dict(id="cpu-bf16", device="cpu", target=1.3, higher=True, unit="ratio",
         goal="CPU with fast bf16 (AMX or AVX512-BF16): bf16 weights >= 1.3 x the lane's fp32 decode tok/s"),
    dict(id="cpu-agreement", device="cpu", target=0.95, higher=True, unit="share",
         goal="CPU: top-1 agreement of bf16 and int8 with the model's own dtype >= 95 % over 256 greedy tokens"),
    dict(id="cpu-prefill", device="cpu", target=1.5, higher=True, unit="ratio",
         goal="CPU: time to first token of a 512-token prompt >= 1.5 x faster than transformers generate()'s"),
    dict(id="cpu-diffusion", device="cpu", target=1.2, higher=True, unit="ratio",
         goal="CPU: diffusion lane, shipped models: >= 1.2 x stock diffusers per denoising step"),
]
CPU_PREFILL_TOKENS = 512
CPU_AGREEMENT_TOKENS = 256


def evaluate_goals(results: Results) -> None:
    """Each goal with the value this run measured (if it ran the workload) and the distance to it:
    met or not where the run was on the goal's device (the GPU goals are stated for an H100, the
    CPU goals for whatever CPU runs them), only the distance elsewhere."""
    device = results.device
    for goal in GOALS:
        own = goal.get("device", "cuda")
        value, detail = _goal_value(results, goal) if own == "cuda" else _cpu_goal_value(results, goal)
        entry = dict(id=goal["id"], goal=goal["goal"], target=goal["target"], unit=goal["unit"], measured=value,
                     detail=detail, met=None, distance=None, device=results.ceilings.name, goal_device=own)
        if value is not None:
            entry["distance"] = value / goal["target"]
            if device.type == own:
                entry["met"] = value >= goal["target"] if goal["higher"] else value <= goal["target"]
            else:
                entry["detail"] = (detail + "; " if detail else "") + "measured on the CPU: the goal is stated for an H100"
        results.goals.append(entry)


def _ok(rows, **match):
    return [r for r in rows if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def _goal_value(results: Results, goal: dict) -> tuple[float | None, str | None]:
    llm, prefill, diffusion = (results.tables[t] for t in ("llm", "prefill", "diffusion"))
    gid = goal["id"]
    if gid in ("llama-decode", "smollm-decode"):
        rows = [r for r in _ok(llm, arch=goal["arch"], path="studio", cache="on", speculative="none")
                if r["decode_tok_s"] and r["precision"] in ("native", "bf16")]
        if not rows:
            return None, "not measured in this run"
        best = max(rows, key=lambda r: r["decode_tok_s"])
        detail = f"best: {best['attention']}, {best['precision']}: {best['decode_tok_s']:.1f} tok/s"
        return (best["decode_share_of_roofline"] if gid == "llama-decode" else best["decode_tok_s"]), detail
    if gid == "llama-prefill":
        rows = [r for r in _ok(prefill, arch=goal["arch"]) if r["tokens"] == 2048]
        if not rows:
            return None, "not measured in this run (needs --shape llama-3.2-1b with 2,048 prefill tokens)"
        best = max(rows, key=lambda r: r["share_of_peak"])
        return best["share_of_peak"], f"best: {best['attention']}, {best['precision']}: {best['ms']:.2f} ms"
    if gid in ("sd-step", "dit-step", "vae-decode"):
        rows = [r for r in _ok(diffusion, arch=goal["arch"], path="studio") if r["cfg"] in ("batched", "sequential")
                and r["preview"] == "none"]
        if not rows:
            return None, "not measured in this run"
        key = "vae_decode_ms" if gid == "vae-decode" else "step_ms"
        best = min(rows, key=lambda r: r[key])
        return best[key], f"best: {best['attention']}, {best['precision']}, CFG {best['cfg']}"
    if gid == "events-overhead":
        parts = [(r["paired_overhead"], f"top-{r['top_logprobs']} alternatives per token ({r['model']})")
                 for r in _ok(llm, path="studio") if r["paired_overhead"] is not None]
        parts += [(r["paired_overhead"], f"{r['preview']} previews per step ({r['model']})")
                  for r in _ok(diffusion, path="studio") if r["paired_overhead"] is not None]
        if not parts:
            return None, "not measured in this run"
        return max(parts)[0], "; ".join(f"{what}: {value:+.1%}" for value, what in parts) + \
            " (wall time per generation, each run paired with one without; the events themselves cannot be switched off)"
    if gid == "llm-memory":
        if not on_gpu_results(results):
            return None, "GPU only: on the CPU the peak RSS holds the whole process"
        rows = [r for r in _ok(llm, path="studio", attention="auto", precision="native", cache="on", speculative="none")
                if not r["top_logprobs"]]
        if not rows:
            return None, "not measured in this run"
        ratios = [(r["peak_mem_bytes"] / (r["weights_bytes"] + r["kv_bytes"]), r["model"]) for r in rows]
        worst = max(ratios)
        return worst[0], ", ".join(f"{m}: {v:.2f}" for v, m in ratios)
    if gid == "sd-memory":
        ours = _ok(diffusion, arch=goal["arch"], path="studio", attention="auto", precision="native", cfg="batched",
                   preview="none")
        stock = _ok(diffusion, arch=goal["arch"], path="stock diffusers")
        if not (ours and stock):
            return None, "not measured in this run"
        key = "peak_mem_bytes" if on_gpu_results(results) else "peak_growth_bytes"
        return ours[0][key] / stock[0][key], f"{key}: ours {ours[0][key]:,} vs stock {stock[0][key]:,}"
    return None, None


def on_gpu_results(results: Results) -> bool:
    return results.device.type == "cuda"


def _cpu_goal_value(results: Results, goal: dict) -> tuple[float | None, str | None]:
    """A CPU goal (issue 13) from this run's rows: a ratio of two rows measured on the same model,
    machine and threads (the worst over the models measured), or an agreement."""
    if results.device.type != "cpu":
        return None, "a CPU goal: measured by a run with --device cpu"
    llm = results.tables["llm"]
    studio = [r for r in _ok(llm, path="studio", cache="on", speculative="none") if r["decode_tok_s"]]
    gid = goal["id"]
    if gid in ("cpu-vs-llamacpp", "cpu-vs-generate"):
        other = "llama.cpp" if gid == "cpu-vs-llamacpp" else "transformers generate()"
        ratios = []
        for ref in _ok(llm, path=other):
            ours = [r for r in studio if r["model"] == ref["model"] and r["top_logprobs"] >= 5]
            if ours and ref["decode_tok_s"]:
                best = max(ours, key=lambda r: r["decode_tok_s"])
                ratios.append((best["decode_tok_s"] / ref["decode_tok_s"],
                               f"{ref['model']}: the lane ({_describe(best)}, top-{best['top_logprobs']}) "
                               f"{best['decode_tok_s']:.1f} tok/s vs {other} {ref['decode_tok_s']:.1f} tok/s"))
        if not ratios:
            why = [f"{r['model']}: {r['reason']}" for r in llm if r["path"] == other and r["status"] != "ok"]
            return None, "not measured in this run" + (f" ({'; '.join(why)})" if why else "")
        return _worst(ratios)
    if gid in ("cpu-int8", "cpu-bf16"):
        fmt = gid.removeprefix("cpu-")
        fast = results.meta.get("cpu_fast_path_weights")
        if fmt == "bf16" and fast and fast["format"] != "bf16":
            return None, f"not applicable: {fast['reason']}"
        ratios = []
        for model in dict.fromkeys(r["model"] for r in studio):
            rows = [r for r in studio if r["model"] == model and not r["top_logprobs"]]
            mine = [r for r in rows if _weights(r) == fmt]
            fp32 = [r for r in rows if _weights(r) == "fp32"]
            if mine and fp32:
                a, b = _best(mine), _best(fp32)
                pairs = [f"{kind}: {x['decode_tok_s'] / y['decode_tok_s']:.2f}x" for kind, x, y in (
                    (kind, _best(mine, kind), _best(fp32, kind)) for kind in ("fast path", "plain loop")) if x and y]
                ratios.append((a["decode_tok_s"] / b["decode_tok_s"],
                               f"{model}: {fmt} {a['decode_tok_s']:.1f} tok/s ({_describe(a)}) vs fp32 "
                               f"{b['decode_tok_s']:.1f} tok/s ({_describe(b)})" + (f"; {', '.join(pairs)}" if pairs else "")))
        return _worst(ratios) if ratios else (None, f"not measured in this run (needs {fmt} and fp32 rows)")
    if gid == "cpu-agreement":
        rows = [r for r in _ok(results.tables["agreement"]) if r["precision"] in ("bf16", "int8")]
        if not rows:
            return None, "not measured in this run"
        worst = min(rows, key=lambda r: r["top1_agreement"])
        detail = "; ".join(f"{r['model']}: {r['precision']} {r['top1_agreement']:.1%} (max logit difference "
                           f"{r['max_logit_difference']:.2f})" for r in rows)
        positions = min(r["positions"] for r in rows)
        if positions < CPU_AGREEMENT_TOKENS:
            detail += f"; over {positions} positions only (the goal counts {CPU_AGREEMENT_TOKENS})"
        return worst["top1_agreement"], detail
    if gid == "cpu-prefill":
        tokens = results.settings.prefill_tokens
        if tokens != CPU_PREFILL_TOKENS:
            return None, f"not measured in this run (needs --prefill-tokens {CPU_PREFILL_TOKENS}; this run: {tokens})"
        prefill = results.tables["prefill"]
        ratios = []
        for ref in _ok(prefill, path="transformers generate()"):
            ours = [r for r in _ok(prefill, model=ref["model"]) if (r.get("path") or "").startswith("studio stream")]
            if ours:
                best = min(ours, key=lambda r: r["ttft_ms"])
                ratios.append((ref["ttft_ms"] / best["ttft_ms"],
                               f"{ref['model']}: {best['path']}, {_weights(best)} weights: {best['ttft_ms']:.0f} ms "
                               f"(prefill event {best['ms']:.0f} ms: {ref['ttft_ms'] / best['ms']:.2f}x) vs generate() "
                               f"{ref['ttft_ms']:.0f} ms, wall clock"))
        return _worst(ratios) if ratios else (None, "not measured in this run")
    if gid == "cpu-diffusion":
        shipped = [m["name"] for m in results.models if m["lane"] == "diffusion" and m["source"] == "pretrained"]
        ratios = []
        for model in shipped:
            rows = [r for r in _ok(results.tables["diffusion"], model=model, path="studio", cfg="batched",
                                   preview="none", precision="native") if r["speedup_vs_stock"]]
            if rows:
                best = max(rows, key=lambda r: r["speedup_vs_stock"])
                ratios.append((best["speedup_vs_stock"], f"{model}: attention {best['attention']}, "
                               f"{best['step_ms']:.0f} ms per step, {best['speedup_vs_stock']:.2f}x stock"))
        return _worst(ratios) if ratios else (None, "not measured in this run (needs a shipped diffusion model)")
    return None, None


def _describe(row: dict) -> str:
    return f"{'fast path' if row['fast_path'] == 'on' else 'plain loop'}, {_weights(row)} weights"


def _weights(row: dict) -> str:
    """The format a row's matmuls read the weights in (results written before the column: from
    its precision, or its dtype)."""
    return row.get("weights") or (row["precision"] if row["precision"] != "native" else row["dtype"])


def _best(rows: list[dict], kind: str | None = None) -> dict | None:
    """The fastest row (of the fast path or the plain loop only, if kind says which)."""
    if kind is not None:
        rows = [r for r in rows if (r["fast_path"] == "on") == (kind == "fast path")]
    return max(rows, key=lambda r: r["decode_tok_s"]) if rows else None


def _worst(ratios: list[tuple[float, str]]) -> tuple[float, str]:
    """The smallest ratio over the models, with every model's detail."""
    return min(r for r, _ in ratios), "; ".join(detail for _, detail in ratios)
