"""The Inspector and Benchmarks tabs: what a config predicts, and what the suite measures.

Depends on gradio, matplotlib, studio.inspector and studio.profiling; imports studio.bench only when
the Benchmarks tab runs it. No model logic here.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from studio import inspector as config_inspector
from studio.profiling import ceilings_for, roofline_axes

BENCH_RESULTS = Path(__file__).resolve().parent.parent.parent / "docs" / "benchmarks"


def latest_measurements(device: torch.device) -> list[dict]:
    """This machine's measured points (the side-by-side table) from the newest results on the same kind
    of device, so the plot shows measured next to predicted."""
    newest = None
    for path in sorted(BENCH_RESULTS.glob("*/bench.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        data = json.loads(path.read_text())
        if data["meta"]["device"].split(":")[0] == device.type:
            newest = data
            break
    return newest["tables"]["side_by_side"] if newest else []


def roofline_figure(analysis, device: torch.device):
    """This device's roof, the config's workloads placed at their intensity on it (predicted), and the
    measured points of this machine's latest benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceilings = ceilings_for(device)
    dtype = analysis.dtype if analysis.dtype in ceilings.peak_flops else "fp32"
    peak, bandwidth = ceilings.peak(dtype), ceilings.bandwidth
    measured = latest_measurements(device)
    intensities = [w.intensity for w in analysis.workloads] + [p["intensity"] for p in measured] + [0.1, 1e3]
    lo, hi = min(intensities) / 3, max(intensities) * 3
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [min(peak, x * bandwidth) / 1e12 for x in xs], lw=2,
            label=f"{ceilings.name} ({ceilings.source}): {peak / 1e12:.3g} TFLOP/s {dtype}, {bandwidth / 1e9:.0f} GB/s")
    for w in analysis.workloads:
        attainable = min(peak, w.intensity * bandwidth)
        ax.scatter(w.intensity, attainable / 1e12, marker="o", s=60, zorder=3, label=f"predicted: {w.name} ({w.detail})")
    for p in measured:
        ax.scatter(p["intensity"], p["tflop_s"], marker="x", s=60, zorder=3,
                   label=f"measured here: {p['lane']} {p['workload']} ({p['model']})")
    roofline_axes(ax, f"{analysis.name} on this device's roofline")
    fig.tight_layout()
    return fig


def summary(analysis) -> str:
    lines = [f"### {analysis.name} — {analysis.architecture}", f"- **{config_inspector.human_count(analysis.parameters)} parameters**"]
    lines.append("- weights: " + ", ".join(f"{dtype} {config_inspector.human_bytes(b)}" for dtype, b in analysis.weight_bytes.items()))
    if analysis.kv_bytes_per_token:
        lines.append(
            f"- KV cache: **{config_inspector.human_bytes(analysis.kv_bytes_per_token)} per token**, "
            f"{config_inspector.human_bytes(analysis.kv_bytes_full_context)} at the full context of {analysis.context_length:,} tokens"
        )
    if analysis.attention_scores_bytes:
        lines.append(
            f"- eager attention would materialise a score matrix of {config_inspector.human_bytes(analysis.attention_scores_bytes)} "
            f"{analysis.attention_scores_shape}; flash-style kernels never build it"
        )
    for w in analysis.workloads:
        lines.append(f"- {w.name} ({w.detail}): {w.flops / 1e9:,.2f} GFLOP, {config_inspector.human_bytes(w.bytes)} moved, "
                     f"**{w.intensity:.1f} FLOP/byte**")
    return "\n".join(lines)


def predictions_table(analysis) -> pd.DataFrame:
    rows = [(p.device, p.workload, float(f"{p.ms:.3g}"), p.bound, float(f"{p.per_second:.4g}")) for p in analysis.predictions]
    return pd.DataFrame(rows, columns=["device", "workload", "predicted ms", "bound", "per second"])


def inspector_tab(default_device: str):
    references = list(config_inspector.reference_configs())
    with gr.Row():
        default = "llama-3.2-1b" if "llama-3.2-1b" in references else (references or [None])[0]
        reference = gr.Dropdown(references, value=default, label="reference architecture")
        device = gr.Dropdown(["cpu"] + (["cuda"] if torch.cuda.is_available() else []), value=default_device,
                             label="this machine's device (measured roof)")
        analyse_button = gr.Button("Analyse", variant="primary")
    pasted = gr.Code(label="…or paste a config.json (used when not empty)", language="json", lines=6)
    details = gr.Markdown()
    table = gr.Dataframe(label="predicted time per step on each known GPU", interactive=False)
    figure = gr.Plot(label="roofline")

    def run(name, config_text, dev):
        try:
            source = json.loads(config_text) if config_text and config_text.strip() else name
            if source is None:
                raise ValueError("choose a reference architecture or paste a config.json")
            analysis = config_inspector.analyse(source)
            return summary(analysis), predictions_table(analysis), roofline_figure(analysis, torch.device(dev))
        except json.JSONDecodeError as error:
            raise gr.Error(f"the pasted config is not valid JSON: {error}") from None
        except (ValueError, KeyError, TypeError) as error:
            raise gr.Error(f"cannot analyse this config: {error}") from None

    analyse_button.click(run, [reference, pasted, device], [details, table, figure], api_name="inspect")


def benchmarks_tab(models, default_device: str):
    gr.Markdown(
        "Run the quick suite on this machine: both lanes against the stock libraries, the attention kernels, "
        "memory, and the roofline. The full suite is `studio bench` (results in docs/benchmarks.md)."
    )
    with gr.Row():
        device = gr.Dropdown(["cpu"] + (["cuda"] if torch.cuda.is_available() else []), value=default_device,
                             label="device")
        lanes = gr.CheckboxGroup(["llm", "diffusion", "attention"], value=["llm", "attention"], label="lanes")
        run_button = gr.Button("Run quick benchmark", variant="primary")
    report = gr.Markdown()
    with gr.Row():
        roofline = gr.Image(label="both lanes on the roofline", type="filepath")
        attention = gr.Image(label="attention kernels: time and peak memory", type="filepath")
    with gr.Row():
        llm = gr.Image(label="LLM lane vs transformers", type="filepath")
        diffusion = gr.Image(label="diffusion lane vs diffusers", type="filepath")

    def run(dev, chosen, progress=gr.Progress(track_tqdm=True)):
        from studio.bench import Settings, run_suite, write_results

        if not chosen:
            raise gr.Error("choose at least one lane")
        settings = Settings.for_device(
            dev, quick=True, lanes=tuple(chosen), llm_models=models.llm_names[:1],
            diffusion_models=models.diffusion_names[:1],  # threads: torch's default, every core
        )
        out = Path(tempfile.mkdtemp(prefix="studio-bench-"))
        paths = write_results(run_suite(settings, progress=True), out)
        return (paths["md"].read_text(), str(paths["png:roofline"]), str(paths["png:attention"]),
                str(paths["png:llm"]), str(paths["png:diffusion"]))

    run_button.click(run, [device, lanes], [report, roofline, attention, llm, diffusion], api_name="bench",
                     concurrency_limit=1, concurrency_id="bench")
