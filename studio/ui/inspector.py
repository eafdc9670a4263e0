"""The Inspector and Benchmarks tabs: what a config predicts, and what the suite measures.

Depends on gradio, matplotlib, studio.inspector, studio.adapters, studio.assets and studio.profiling;
imports studio.bench only when the Benchmarks tab runs it. No model logic here.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from studio import adapters, assets
from studio import inspector as config_inspector
from studio.profiling import Ceilings, ceilings_for, roofline_axes

BENCH_RESULTS = Path(__file__).resolve().parent.parent.parent / "docs" / "benchmarks"


def latest_benchmark(device: torch.device) -> dict | None:
    """The newest benchmark results (docs/benchmarks/*/bench.json) of the same kind of device, for
    the plot's measured points next to the predicted ones."""
    for path in sorted(BENCH_RESULTS.glob("*/bench.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        data = json.loads(path.read_text())
        if data["meta"]["device"].split(":")[0] == device.type:
            return data
    return None


def ceiling_dtype(dtype: str, ceilings: Ceilings) -> str:
    """The matmul ceiling a workload in `dtype` runs against: its own, else fp16's, else fp32's
    (as the inspector's predictions fall back)."""
    return next((k for k in (dtype, "fp16", "fp32") if k in ceilings.peak_flops), "fp32")


def roofline_figure(analysis, device: torch.device, benchmark: dict | None = None):
    """One roof per dtype among the points, each point drawn against and labelled with its own: the
    config's workloads placed at their intensity (predicted, in the analysis's dtype) and the
    measured points of this machine's latest benchmark (each in the dtype it ran in; `benchmark`:
    that benchmark's results, by default the newest on this kind of device).

    The roofs are the ceilings that benchmark probed in the same run as its points (a roof probed at
    another moment, under another load, says nothing about them); without one, this device's."""
    # a Figure of its own, not pyplot's: pyplot keeps every figure it made until closed, so each
    # analysis would stay in memory for the life of the app
    from matplotlib.figure import Figure

    benchmark = benchmark if benchmark is not None else latest_benchmark(device)
    measured = benchmark["tables"]["side_by_side"] if benchmark else []
    ceilings = Ceilings(**benchmark["ceilings"]) if benchmark else ceilings_for(device)
    predicted = ceiling_dtype(analysis.dtype, ceilings)
    dtypes = sorted({predicted} | {p["dtype"] for p in measured if p["dtype"] in ceilings.peak_flops})
    colors = {dtype: f"C{i}" for i, dtype in enumerate(dtypes)}
    bandwidth = ceilings.bandwidth
    intensities = [w.intensity for w in analysis.workloads] + [p["intensity"] for p in measured] + [0.1, 1e3]
    lo, hi = min(intensities) / 3, max(intensities) * 3
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for dtype in dtypes:
        peak = ceilings.peak_flops[dtype]
        ax.plot(xs, [min(peak, x * bandwidth) / 1e12 for x in xs], lw=2, color=colors[dtype],
                label=f"roof: {dtype} {peak / 1e12:.3g} TFLOP/s, {bandwidth / 1e9:.0f} GB/s "
                      f"({ceilings.name}, {ceilings.source})")
    for w in analysis.workloads:
        attainable = min(ceilings.peak_flops[predicted], w.intensity * bandwidth)
        ax.scatter(w.intensity, attainable / 1e12, marker="o", s=60, zorder=3, color=colors[predicted],
                   edgecolor="black", label=f"predicted: {w.name} ({w.detail}), {predicted}")
    for p in measured:
        ax.scatter(p["intensity"], p["tflop_s"], marker="x", s=60, zorder=3, color=colors.get(p["dtype"], "grey"),
                   label=f"measured here: {p['lane']} {p['workload']} ({p['model']}), {p['dtype']}")
    roofline_axes(ax, f"{analysis.name} on this device's roofline, one roof per dtype")
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


PASTED_CHARS = 200_000  # a config.json is a few kilobytes
NESTING = 20  # a config nests a few levels deep (text_config, rope_scaling)
COUNTS = re.compile(r"layers|heads|experts|groups|per_block|per_tok")  # a few to a few hundred
LENGTHS = re.compile(r"position|length|window")  # a context, up to millions of tokens
SIZES = re.compile(r"size|dim|channels|vocab")  # a width, up to hundreds of thousands
LIMITS = ((COUNTS, 1024), (LENGTHS, 2**30), (SIZES, 2**22))
JSON_TYPES = {str: "string", list: "array", int: "number", float: "number", bool: "true/false", type(None): "null"}


def pasted_config(text: str) -> dict:
    """A pasted config.json as a dict, or a ValueError saying what is wrong with it.

    Only a JSON object is read: a name or a path is never looked up (the browser must not read a
    server's files or start a download), and its sizes must be ones the inspector can build a
    model of on the meta device in a moment."""
    if len(text) > PASTED_CHARS:
        raise ValueError(f"the pasted config is {len(text):,} characters long; a config.json is a few thousand "
                         f"(the most read is {PASTED_CHARS:,})")
    try:
        config = json.loads(text)
    except RecursionError:
        raise ValueError(f"the pasted config nests deeper than JSON can be read here; a config.json nests a few "
                         f"levels (the most read is {NESTING})") from None
    except ValueError as error:  # JSONDecodeError, or a number too long to read
        raise ValueError(f"the pasted config is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(
            'paste the contents of a config.json, a JSON object such as {"model_type": "llama", "hidden_size": 2048, '
            f"...}}; got a JSON {JSON_TYPES.get(type(config), 'value')}. To analyse a known model, clear this box and choose it "
            "from the reference architectures (names and paths typed here are not looked up)"
        )
    check_sizes(config)
    return config


def check_sizes(config: dict) -> None:
    """Refuse nesting deeper than NESTING, and sizes, counts and lengths outside LIMITS."""
    pending = [(config, "", 1)]
    while pending:
        value, where, depth = pending.pop()
        if depth > NESTING:
            raise ValueError(f"the pasted config nests deeper than {NESTING} levels (at {where}); a config.json "
                             "nests a few")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            path = f"{where}.{key}" if where else str(key)
            if isinstance(item, (dict, list)):
                pending.append((item, path, depth + 1))
            name = str(key) if isinstance(value, dict) else where.rsplit(".", 1)[-1]
            limit = next((top for pattern, top in LIMITS if pattern.search(name)), None)
            if limit is None or isinstance(item, bool) or not isinstance(item, (int, float)):
                continue  # a flag, a name or a nested part (checked on its own)
            if not 0 <= item <= limit:  # a non-integer size gets the library's own message
                raise ValueError(f"{path} must be a whole number from 0 to {limit:,}; got {item!r}")


def listed_adapters(operator: dict[str, list[str]]) -> dict[str, str | None]:
    """The LoRA adapters the Inspector offers, each with its base model: the shipped ones (None:
    their manifest entry names it), then the operator's (STUDIO_ADAPTERS, by base)."""
    listed = {name: None for kind in assets.ADAPTER_KINDS for name in assets.list_models(kind)}
    listed.update({folder: base for base, folders in operator.items() for folder in folders if folder not in listed})
    return listed


def adapter_report(report: dict) -> tuple[str, pd.DataFrame]:
    """An adapter's report as the Inspector shows it: the terminal's text, and a table per target."""
    table = pd.DataFrame(report["targets"], columns=["component", "target", "layers", "parameters", "bytes",
                                                     "base_bytes"])
    table["share of base bytes"] = (table["bytes"] / table["base_bytes"]).map(lambda share: f"{share:.2%}")
    return f"```text\n{adapters.format_adapter(report)}\n```", table


def inspector_tab(models, default_device: str):
    references = config_inspector.reference_configs()  # name -> its folder
    listed = listed_adapters(models.operator_adapters)  # adapter -> its base (None: the manifest's)
    with gr.Row():
        default = "llama-3.2-1b" if "llama-3.2-1b" in references else next(iter(references), None)
        reference = gr.Dropdown(list(references) + list(listed), value=default,
                                label="reference architecture, or a LoRA adapter (against its base)")
        device = gr.Dropdown(["cpu"] + (["cuda"] if torch.cuda.is_available() else []), value=default_device,
                             label="this machine's device (measured roof)")
        analyse_button = gr.Button("Analyse", variant="primary")
    pasted = gr.Code(label="…or paste the contents of a config.json (a JSON object; used when not empty)",
                     language="json", lines=6)
    details = gr.Markdown()
    table = gr.Dataframe(label="predicted time per step on each known GPU (an adapter: its weights per target layer)",
                         interactive=False)
    figure = gr.Plot(label="roofline")

    def run(name, config_text, dev):
        # a pasted config (a JSON object) or a reference or adapter from the list, never a path or hub id
        source = None  # an adapter from the list
        try:
            if config_text and config_text.strip():
                source = pasted_config(config_text)
            elif name in references:
                source = references[name]  # the reference's folder: no lookup by name
            elif name not in listed:
                raise ValueError("choose a reference architecture or paste a config.json")
        except ValueError as error:
            raise gr.Error(str(error)) from None
        try:
            if source is None:
                return (*adapter_report(adapters.inspect_adapter(name, base=listed[name])), None)
            analysis = config_inspector.analyse(source)
            return summary(analysis), predictions_table(analysis), roofline_figure(analysis, torch.device(dev))
        except Exception as error:  # whatever the config makes the libraries raise: the user sees why
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise gr.Error(f"cannot analyse this {'adapter' if source is None else 'config'}: {first}") from None

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
