"""`studio bench`: both lanes side by side on this device, measured the same way, next to the stock
libraries and the device's roofline; written as JSON, CSV, a markdown table and PNG plots.

    results = run_suite(Settings.for_device("cpu", quick=True, llm_shapes=["tiny-llama"]))
    paths = write_results(results, "results/quick")

The tables, one row per workload:
    llm           the LLM lane per attention kernel, precision, KV cache on/off, fast path (compiled; its
                  weights in the device's default format, the model's own dtype, int8), speculative mode
                  (and per-token alternatives on/off), next to transformers' generate() and llama.cpp
                  (the same GGUF file, prompts, length and threads) on the same model
    prefill       one long prompt through the LLM: TFLOP/s and share of the matmul peak, per kernel; and
                  its time to first token on the lane (fast path, plain loop), generate() and llama.cpp
    agreement     how far bf16, int8 and fp16 move the LLM's greedy choice from its own dtype
    diffusion     the diffusion lane per kernel, precision, CFG batched/sequential/off (and previews on/off),
                  next to the stock diffusers pipeline built from the same components
    attention     every attention kernel on one long causal sequence: time, TFLOP/s, peak memory
    side_by_side  prefill, decode, a denoising step and a VAE decode on this device's roofline
    inspector     what studio.inspector predicts from the config against what was measured
and `goals` lists the goals of the lane issues with the measured distance to each. Rows that
cannot run here are listed as skipped, with the reason; none is faked.

One module per concern; each imports only those above it in this list, so no two import each other:
    measure     timing over rotating inputs, peak memory, memory deltas (how every figure is taken)
    shapes      reference architectures with random weights, the byte tokenizer
    results     Settings, the tables' columns, Results, and what every lane needs to add a row
    agreement   precision agreement, teacher-forced, and the agreement table
    llamacpp    llama.cpp through the cyllama binding: the GGUF file of a model, timed as the lane is
    attention   the attention-kernel table
    prefill     the prefill table: the long forward per kernel, time to first token per path
    llm         the LLM lane table, with generate() and llama.cpp next to it (and the prefill and
                agreement tables' tasks, which take the LLM's bench as an argument)
    diffusion   the diffusion lane table, with the stock diffusers pipeline next to it
    goals       the side-by-side table and the goals, from the lanes' rows
    report      writing JSON, CSV, markdown and plots; measured next to predicted for `studio inspect`
    suite       run_suite: the plan, run workload by workload

Like studio.cli, the bench is a consumer of the lanes: it imports the pipelines, inside its
functions, which no other core module does. It never imports the UI.
"""

from studio.bench.attention import AttentionBench
from studio.bench.diffusion import DiffusionBench
from studio.bench.goals import GOALS, evaluate_goals, side_by_side
from studio.bench.llm import LLMBench
from studio.bench.measure import MemoryDelta, PeakMemory, malloc_trim, rss_bytes
from studio.bench.report import format_measured, markdown, measured_for, plot, write_results
from studio.bench.results import COLUMNS, DEFAULT_DIFFUSION, DEFAULT_LLM, TABLES, Results, Settings
from studio.bench.shapes import build_diffusion_shape, build_llm_shape, byte_tokenizer
from studio.bench.suite import run_suite

__all__ = [
    "COLUMNS",
    "DEFAULT_DIFFUSION",
    "DEFAULT_LLM",
    "GOALS",
    "TABLES",
    "AttentionBench",
    "DiffusionBench",
    "LLMBench",
    "MemoryDelta",
    "PeakMemory",
    "Results",
    "Settings",
    "build_diffusion_shape",
    "build_llm_shape",
    "byte_tokenizer",
    "evaluate_goals",
    "format_measured",
    "malloc_trim",
    "markdown",
    "measured_for",
    "plot",
    "rss_bytes",
    "run_suite",
    "side_by_side",
    "write_results",
]
