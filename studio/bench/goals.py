"""What the rows of a `studio bench` run add up to, once the lanes have run: the side-by-side table
(prefill, decode, a denoising step and a VAE decode on this device's roofline) and the goals of
the lane issues, each with the measured distance to it.

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


# The goals of the lane issues, stated for an H100 (shared/ANCHORS.md has what stock tools reach).
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
]


def evaluate_goals(results: Results) -> None:
    """Each goal with the value this run measured (if it ran the workload) and the distance to it."""
    device = results.device
    on_gpu = device.type == "cuda"
    for goal in GOALS:
        value, detail = _goal_value(results, goal)
        entry = dict(id=goal["id"], goal=goal["goal"], target=goal["target"], unit=goal["unit"], measured=value,
                     detail=detail, met=None, distance=None, device=results.ceilings.name)
        if value is not None:
            entry["distance"] = value / goal["target"]
            if on_gpu:
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
