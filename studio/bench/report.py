"""How `studio bench` writes what it measured: bench.json, one CSV per table, bench.md and PNG plots;
and the measured rows of a results file next to the inspector's prediction (`studio inspect
--results`).

Depends on studio.inspector (number formats), studio.profiling (the roofline plot's axes) and
studio.bench.results; imports matplotlib inside `plot`. Reads results as plain data, so it never
imports a lane of the bench, the goals, a pipeline or the UI.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from studio import inspector
from studio.bench.results import COLUMNS, TABLES, Results
from studio.profiling import roofline_axes


def write_results(results: Results | dict, out: str | Path) -> dict[str, Path]:
    """Write bench.json, one CSV per table, bench.md and the plots into `out`; returns the paths."""
    data = results.to_json() if isinstance(results, Results) else results
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json"}
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    for table in TABLES:
        path = paths[f"csv:{table}"] = out / f"{table}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS[table], extrasaction="ignore")
            writer.writeheader()
            for row in data["tables"][table]:
                writer.writerow(row)
    paths["md"] = out / "bench.md"
    paths["md"].write_text(markdown(data))
    paths.update(plot(data, out))
    return paths


def _fmt(value, kind: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{value:.1%}" if abs(value) < 0.1 else f"{value:.0%}"
    if kind == "x":
        return f"{value:.2f}×" if value >= 0.1 else f"{value:.2g}×"
    if kind == "bytes":
        return inspector.human_bytes(value)
    if kind == "err":
        return f"{value:+.1%}"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _spread(median, low, high, kind="") -> str:
    if median is None:
        return "–"
    return f"{_fmt(median, kind)} ({_fmt(low, kind)}–{_fmt(high, kind)})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "Nothing ran."
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _skipped(rows: list[dict], label) -> str:
    skipped = [r for r in rows if r["status"] != "ok"]
    if not skipped:
        return ""
    lines = [f"- {label(r)}: **{r['status']}** — {r['reason']}" for r in skipped]
    return "\nNot run here:\n\n" + "\n".join(lines) + "\n"


def markdown(data: dict) -> str:
    """The results as markdown: one table per lane, side by side, the inspector and the goals."""
    meta, ceilings, tables = data["meta"], data["ceilings"] or {}, data["tables"]
    peaks = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in (ceilings.get("peak_flops") or {}).items())
    out = [
        f"# studio bench: {meta['device_name']} ({meta['device']})",
        "",
        f"- started {meta['started']}; torch {meta['torch']}, transformers {meta.get('transformers')}, "
        f"diffusers {meta.get('diffusers')}; {meta['torch_threads']} torch thread(s) of {meta['cpu_count']} CPUs"
        + ("; --quick" if meta["quick"] else ""),
        f"- ceilings ({ceilings.get('source')}): {peaks}; memory {ceilings.get('bandwidth', 0) / 1e9:.1f} GB/s",
        f"- peak memory: {meta['memory_method']}",
        "- times: median (min–max) over the repeats, warm-up excluded; TTFT and decode tok/s are wall clock, "
        "prefill and denoising steps device time",
    ]
    if meta.get("command"):
        out.append(f"- command: `{meta['command']}`")

    llm = tables["llm"]
    if llm:
        out += ["", "## LLM lane", "", _table(
            ["model", "path", "attention", "precision", "weights", "LoRA", "cache", "fast path", "speculative", "alts",
             "compile s", "TTFT ms", "prefill tok/s", "prefill TFLOP/s", "decode tok/s", "GB/s", "% BW roofline",
             "× stock", "accept", "KV bytes", "peak mem"],
            [[r["model"], r["path"], r["attention"], r["precision"], r.get("weights"), r.get("adapter"), r["cache"], r["fast_path"],
              r["speculative"], r["top_logprobs"], _fmt(r.get("compile_s")), _fmt(r["ttft_ms"]), _fmt(r["prefill_tok_s"]), _fmt(r["prefill_tflop_s"] and r["prefill_tflop_s"]),
              _spread(r["decode_tok_s"], r["decode_tok_s_min"], r["decode_tok_s_max"]), _fmt(r["decode_gb_s"]),
              _fmt(r["decode_share_of_roofline"], "pct"), _fmt(r["speedup_vs_stock"], "x"),
              _fmt(r["acceptance_rate"], "pct"), _fmt(r["kv_bytes"], "bytes"), _fmt(r["peak_mem_bytes"], "bytes")]
             for r in llm if r["status"] == "ok"],
        )]
        notes = [f"- {r['model']}: {r['path']} {r.get('weights')} {_llm_label(r)}: {r['reason']}"
                 for r in llm if r["status"] == "ok" and r["reason"]]
        out.append("\ncompile s: the fast path's compile time, apart from the warm-up; TTFT and decode tok/s are wall "
                   "clock, the same way for every path." + ("\n\nNotes:\n\n" + "\n".join(notes) if notes else ""))
        out.append(_skipped(llm, lambda r: f"{r['model']}: {r['path']} attention={r['attention']} "
                            f"precision={r['precision']} cache={r['cache']} fast path={r['fast_path']} "
                            f"speculative={r['speculative']}"))
    prefill = tables["prefill"]
    if prefill:
        out += ["", "## LLM prefill", "", _table(
            ["model", "path", "attention", "precision", "weights", "tokens", "ms", "TTFT ms", "tok/s", "TFLOP/s",
             "% matmul peak", "× generate()", "S² scores", "peak mem", "growth"],
            [[r["model"], r.get("path", "studio (prefill forward)"), r["attention"], r["precision"], r.get("weights"),
              r["tokens"], _spread(r["ms"], r["ms_min"], r["ms_max"]), _fmt(r.get("ttft_ms")), _fmt(r["tok_s"]),
              _fmt(r["tflop_s"]), _fmt(r["share_of_peak"], "pct"), _fmt(r.get("speedup_vs_stock"), "x"), _fmt(r["scores_bytes"], "bytes"),
              _fmt(r["peak_mem_bytes"], "bytes"), _fmt(r["peak_growth_bytes"], "bytes")]
             for r in prefill if r["status"] == "ok"],
        ), "", "prefill forward: one forward over random tokens, device time. studio stream / generate() / llama.cpp: "
               "a prompt of that length and one new token; ms is the lane's prefill event (the others: wall clock), "
               "TTFT the wall clock of the whole call, × generate() compares TTFT with TTFT."]
        out.append(_skipped(prefill, lambda r: f"{r['model']}: {r.get('path', 'studio')} attention={r['attention']} "
                            f"precision={r['precision']}"))
    agreement = tables.get("agreement") or []
    if agreement:
        out += ["", "## Precision agreement (teacher-forced, greedy)", "", _table(
            ["model", "precision", "against", "positions", "top-1 agreement", "first disagreement",
             "max logit difference"],
            [[r["model"], r["precision"], r["reference"], r["positions"], _fmt(r["top1_agreement"], "pct"),
              _fmt(r["first_disagreement"]), _fmt(r["max_logit_difference"])]
             for r in agreement if r["status"] == "ok"],
        ), "", "The model's own greedy continuation, fed back whole through the model in its own dtype and in the "
               "precision: at each position, whether both pick the same next token (studio.bench.agreement)."]
        out.append(_skipped(agreement, lambda r: f"{r['model']}: {r['precision']}"))
    diffusion = tables["diffusion"]
    if diffusion:
        out += ["", "## Diffusion lane", "", _table(
            ["model", "path", "attention", "precision", "LoRA", "fast path", "CFG", "preview", "image", "ms/step", "it/s", "TFLOP/s",
             "% matmul peak", "VAE decode ms", "ms/image", "× stock", "peak mem", "growth"],
            [[r["model"], r["path"], r["attention"], r["precision"], r.get("adapter"), r.get("fast_path"), r["cfg"],
              r["preview"], r["image"],
              _spread(r["step_ms"], r["step_ms_min"], r["step_ms_max"]), _fmt(r["it_s"]), _fmt(r["tflop_s"]),
              _fmt(r["share_of_peak"], "pct"), _fmt(r["vae_decode_ms"]), _fmt(r["image_ms"]),
              _fmt(r["speedup_vs_stock"], "x"), _fmt(r["peak_mem_bytes"], "bytes"), _fmt(r["peak_growth_bytes"], "bytes")]
             for r in diffusion if r["status"] == "ok"],
        )]
        out.append(_skipped(diffusion, lambda r: f"{r['model']}: {r['path']} attention={r['attention']} "
                            f"precision={r['precision']} cfg={r['cfg']}"))
    attention = tables["attention"]
    if attention:
        first = next((r for r in attention), None)
        out += ["", f"## Attention kernels (B={first['batch']}, H={first['heads']}, S={first['seq']:,}, "
                f"D={first['head_dim']}, causal, {first['dtype']})", "", _table(
                    ["kernel", "runs as", "ms", "TFLOP/s", "% matmul peak", "S² score matrix", "builds it",
                     "peak mem", "growth"],
                    [[r["kernel"], r["resolved"], _spread(r["ms"], r["ms_min"], r["ms_max"]), _fmt(r["tflop_s"]),
                      _fmt(r["share_of_peak"], "pct"), _fmt(r["scores_bytes"], "bytes"),
                      "yes" if r["materialises_scores"] else "no", _fmt(r["peak_mem_bytes"], "bytes"),
                      _fmt(r["peak_growth_bytes"], "bytes")]
                     for r in attention if r["status"] == "ok"],
                )]
        out.append(_skipped(attention, lambda r: r["kernel"]))
    side = tables["side_by_side"]
    if side:
        out += ["", "## Side by side on this device's roofline", "", _table(
            ["lane", "workload", "model", "ms", "FLOPs", "bytes", "FLOP/byte", "ridge", "bound", "TFLOP/s", "GB/s",
             "share of roof", "roofline ms"],
            [[r["lane"], r["workload"], r["model"], _fmt(r["ms"]), inspector.human_count(r["flops"]),
              _fmt(r["bytes"], "bytes"), _fmt(r["intensity"]), _fmt(r["ridge"]), r["bound"], _fmt(r["tflop_s"]),
              _fmt(r["gb_s"]), _fmt(r["share"], "pct"), _fmt(r["predicted_ms"])] for r in side],
        ), "", "![roofline](roofline.png)"]
    predicted_rows = tables["inspector"]
    if predicted_rows:
        out += ["", "## Predicted (studio inspect) against measured", "", _table(
            ["model", "quantity", "predicted", "measured", "error", "how it was measured"],
            [[r["model"], r["quantity"], _fmt(r["predicted"], "bytes" if r["unit"] == "bytes" else ""),
              _fmt(r["measured"], "bytes" if r["unit"] == "bytes" else ""), _fmt(r["error"], "err"), r["method"]]
             for r in predicted_rows],
        ), "", "error = measured / predicted − 1. Times are the roofline's lower bound on this device: the error "
           "is how far the run stayed from it."]
    goals = data.get("goals") or []
    if goals:
        out += ["", "## Goals", "", _table(
            ["goal", "measured", "met", "distance (measured / target)", "notes"],
            [[g["goal"], _goal_fmt(g), _met(g, data["meta"]["device"]),
              _fmt(g["distance"], "x") if g["distance"] is not None else "–", g["detail"] or ""] for g in goals],
        )]
    return "\n".join(out).rstrip() + "\n"


def _llm_label(r: dict) -> str:
    return (f"cache={r['cache']} fast path={r['fast_path']} speculative={r['speculative']} "
            f"top_logprobs={r['top_logprobs']}")


def _met(goal: dict, device: str) -> str:
    """yes / no where the run was on the goal's device; the GPU goals measured on a CPU say so."""
    own = goal.get("goal_device", "cuda")
    if goal["measured"] is not None and not device.startswith(own):
        return "– (GPU goal)" if own == "cuda" else "– (CPU goal)"
    return {True: "yes", False: "no", None: "–"}[goal["met"]]


def _goal_fmt(goal: dict) -> str:
    value = goal["measured"]
    if value is None:
        return "not measured"
    if goal["unit"] in ("share", "overhead"):
        return _fmt(value, "pct")
    if goal["unit"] == "ratio":
        return _fmt(value, "x")
    return f"{_fmt(value)} {goal['unit']}"


def plot(data: dict, out: Path) -> dict[str, Path]:
    """roofline.png (the side-by-side workloads and the attention kernels on this device's roof),
    llm.png, diffusion.png and attention.png (bars per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    tables, ceilings = data["tables"], data["ceilings"]

    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = tables["side_by_side"]
    dtypes = sorted({p["dtype"] for p in points} | {r["dtype"] for r in tables["attention"] if r["status"] == "ok"})
    intensities = [p["intensity"] for p in points] + [0.1, 1e4]
    lo, hi = min(intensities) / 3, max(intensities) * 3
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    bandwidth = ceilings["bandwidth"]
    for dtype in dtypes or ["fp32"]:
        peak = ceilings["peak_flops"].get(dtype)
        if peak:
            ax.plot(xs, [min(peak, x * bandwidth) / 1e12 for x in xs], lw=2,
                    label=f"roof: {dtype} {peak / 1e12:.3g} TFLOP/s, {bandwidth / 1e9:.0f} GB/s")
    markers = {"prefill": "o", "decode": "v", "denoise step": "s", "vae decode": "D"}
    for p in points:
        ax.scatter(p["intensity"], p["tflop_s"], marker=markers.get(p["workload"], "o"), s=70, zorder=3,
                   label=f"{p['lane']}: {p['workload']} ({p['model']}), {p['dtype']}")
    for r in tables["attention"]:
        if r["status"] == "ok":
            elem = {"fp32": 4, "bf16": 2, "fp16": 2}[r["dtype"]]
            flops = 4 * r["batch"] * r["heads"] * r["head_dim"] * r["seq"] * (r["seq"] + 1) / 2
            nbytes = 4 * r["batch"] * r["heads"] * r["seq"] * r["head_dim"] * elem
            ax.scatter(flops / nbytes, r["tflop_s"], marker="x", s=30, color="grey", zorder=2)
            ax.annotate(f"{r['kernel']} {r['dtype']}", (flops / nbytes, r["tflop_s"]), fontsize=6, color="grey")
    roofline_axes(ax, f"Both lanes on the roofline of {ceilings['name']}")
    fig.tight_layout()
    paths["png:roofline"] = out / "roofline.png"
    fig.savefig(paths["png:roofline"], dpi=120)
    plt.close(fig)

    def bars(name, rows, label, value, xlabel, title):
        rows = [r for r in rows if r["status"] == "ok" and r.get(value)]
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(rows) + 1)))
        if rows:
            colors = ["tab:orange" if r.get("path", "studio") != "studio" else "tab:blue" for r in rows]
            ax.barh(range(len(rows)), [r[value] for r in rows], color=colors)
            ax.set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=6)
            ax.invert_yaxis()
        else:
            ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        paths[f"png:{name}"] = out / f"{name}.png"
        fig.savefig(paths[f"png:{name}"], dpi=110)
        plt.close(fig)

    bars("llm", tables["llm"],
         lambda r: f"{r['model'][:24]} {r['path'] if r['path'] != 'studio' else ''} {r['attention'] or ''} "
                   f"{r.get('weights') or r['precision']} cache {r['cache']}"
                   f"{' fast path' if r['fast_path'] == 'on' and r['path'] == 'studio' else ''}"
                   f"{' top-' + str(r['top_logprobs']) if r['top_logprobs'] else ''}"
                   f" {r['speculative'] if r['speculative'] != 'none' else ''}",
         "decode_tok_s", "decode tokens/s (wall clock; orange: transformers generate(), llama.cpp)", "LLM lane: decode")
    bars("diffusion", tables["diffusion"],
         lambda r: f"{r['model'][:24]} {r['path'] if r['path'] != 'studio' else ''} {r['attention'] or ''} "
                   f"{r['precision']} CFG {r['cfg']}",
         "step_ms", "ms per denoising step (orange: stock diffusers)", "Diffusion lane: one denoising step")
    rows = [r for r in tables["attention"] if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, max(2.5, 0.3 * len(rows) + 1.2)), sharey=True)
    labels = [f"{r['kernel']} ({r['resolved']})" if r["resolved"] != r["kernel"] else r["kernel"] for r in rows]
    left.barh(range(len(rows)), [r["ms"] for r in rows], xerr=[[r["ms"] - r["ms_min"] for r in rows],
                                                              [r["ms_max"] - r["ms"] for r in rows]])
    left.set_yticks(range(len(rows)), labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("ms per call (median, min-max)")
    right.barh(range(len(rows)), [r["peak_growth_bytes"] / 2**20 for r in rows],
               color=["tab:red" if r["materialises_scores"] else "tab:green" for r in rows])
    if rows:
        right.axvline(rows[0]["scores_bytes"] / 2**20, color="grey", ls="--", lw=1, label="one S² score matrix")
        right.legend(fontsize=7)
        first = rows[0]
        fig.suptitle(f"Attention kernels: B={first['batch']}, H={first['heads']}, S={first['seq']:,}, "
                     f"D={first['head_dim']}, causal, {first['dtype']}", fontsize=9)
    right.set_xlabel("peak memory growth (MiB; red: builds the S² scores)")
    for ax in (left, right):
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    paths["png:attention"] = out / "attention.png"
    fig.savefig(paths["png:attention"], dpi=110)
    plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# Measured against predicted, for `studio inspect --results`


def measured_for(results: dict, name: str) -> list[dict]:
    """The inspector rows of a results file for the model called `name` (or built from it)."""
    wanted = name.lower()
    rows = []
    for row in results["tables"].get("inspector", []):
        model = str(row["model"]).lower()
        if model == wanted or model.startswith(wanted + " ") or wanted in {
            str(m.get("arch") or "").lower() for m in results.get("models", []) if m["name"] == row["model"]
        }:
            rows.append(row)
    return rows


def format_measured(results: dict, name: str) -> str:
    rows = measured_for(results, name)
    ceilings = results.get("ceilings") or {}
    if not rows:
        names = ", ".join(m["name"] for m in results.get("models", [])) or "none"
        return f"  no measurements of {name} in these results (models measured: {names})"
    lines = [f"  measured on {ceilings.get('name')} ({results['meta']['started']}), against the prediction for that device:"]
    for r in rows:
        kind = "bytes" if r["unit"] == "bytes" else ""
        lines.append(f"    {r['quantity']:<44} predicted {_fmt(r['predicted'], kind):>10}  measured "
                     f"{_fmt(r['measured'], kind):>10}  error {_fmt(r['error'], 'err'):>7}   ({r['method']})")
    return "\n".join(lines)
