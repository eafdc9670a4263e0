"""What a `studio bench` run is asked for and what it records: `Settings`, the tables' columns,
`Results`, and what every lane needs to add a row to them: a blank row of a table, a "failed" row
that says why, the attention kernels and precisions a lane runs (and why the others are skipped),
and the matmul ceiling a row is held against.

Depends on torch, studio.backends, studio.profiling and studio.bench.measure; never imports a lane
of the bench (attention, llm, diffusion), the goals, the report, a pipeline or the UI.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass, field, fields

import torch

from studio import backends
from studio.bench.measure import PeakMemory
from studio.profiling import Ceilings, roofline

DEFAULT_LLM = "smollm2-135m"  # the shipped default models
DEFAULT_DIFFUSION = "fashion-dit"  # the shipped diffusion model (emoji-sd is not trained yet)
TILED_MAX_BLOCK_PAIRS = 1024  # the tiled kernel is a Python loop over 64x64 blocks: beyond this, minutes per step
QUICK_ATTENTION = ("auto", "eager", "tiled")  # the kernels --quick runs in the lanes

# every table's columns, in the order the CSV files and the markdown show them
COLUMNS = {
    "llm": [
        "model", "arch", "path", "attention", "precision", "dtype", "weights", "cache", "fast_path", "speculative",
        "top_logprobs", "adapter", "status", "reason", "prompt_tokens", "new_tokens", "repeats", "warmup_ms", "compile_s",
        "ttft_ms", "ttft_ms_min", "ttft_ms_max", "prefill_ms", "prefill_tok_s", "prefill_tflop_s",
        "prefill_share_of_peak", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "decode_step_ms",
        "decode_gb_s", "decode_share_of_roofline", "speedup_vs_stock", "acceptance_rate", "run_ms", "paired_overhead",
        "weights_bytes", "kv_bytes", "kv_bytes_predicted", "activations_bytes", "peak_mem_bytes",
        "peak_growth_bytes",
    ],
    "prefill": [
        "model", "arch", "path", "attention", "precision", "dtype", "weights", "tokens", "status", "reason", "repeats",
        "warmup_ms", "ms", "ms_min", "ms_max", "ttft_ms", "tok_s", "tflop_s", "share_of_peak", "speedup_vs_stock",
        "scores_bytes", "peak_mem_bytes", "peak_growth_bytes",
    ],
    # how far a matmul precision moves the model's greedy choice (studio.bench.agreement)
    "agreement": [
        "model", "precision", "reference", "status", "reason", "positions", "top1_agreement", "first_disagreement",
        "max_logit_difference", "ms",
    ],
    "diffusion": [
        "model", "arch", "path", "attention", "precision", "dtype", "fast_path", "cfg", "preview", "adapter", "status",
        "reason", "image",
        "steps", "repeats", "warmup_ms", "compile_s", "step_ms", "step_ms_min", "step_ms_max", "it_s", "tflop_s",
        "share_of_peak", "vae_decode_ms", "vae_tflop_s", "image_ms", "paired_overhead", "speedup_vs_stock",
        "weights_bytes",
        "peak_mem_bytes", "peak_growth_bytes",
    ],
    "attention": [
        "kernel", "resolved", "batch", "heads", "seq", "head_dim", "causal", "dtype", "status", "reason", "repeats",
        "warmup_ms", "ms", "ms_min", "ms_max", "tflop_s", "share_of_peak", "scores_bytes", "materialises_scores",
        "peak_mem_bytes", "peak_growth_bytes",
    ],
    "side_by_side": [
        "lane", "workload", "model", "variant", "dtype", "ms", "flops", "bytes", "intensity", "ridge", "bound",
        "tflop_s", "gb_s", "share", "predicted_ms",
    ],
    "inspector": ["model", "quantity", "unit", "predicted", "measured", "error", "method"],
}
TABLES = tuple(COLUMNS)


# The kinds of rows each lane's table has, for Settings.llm_rows / diffusion_rows (--llm-rows ...):
LLM_ROWS = ("default", "kernels", "precisions", "no-cache", "speculative", "events", "fast", "fast-events",
            "fast-own-dtype", "fast-int8", "adapter", "generate", "generate-static", "llama.cpp", "prefill",
            "first-token", "agreement")
DIFFUSION_ROWS = ("stock", "stock-compiled", "plain", "default", "kernels", "precisions", "sequential", "cfg-off",
                  "previews", "compiled", "adapter")


@dataclass
class Settings:
    device: str
    quick: bool = False
    llm_models: list[str] = field(default_factory=list)  # shipped names, folders or hub ids (real weights)
    llm_shapes: list[str] = field(default_factory=list)  # reference configs built with random weights
    diffusion_models: list[str] = field(default_factory=list)
    diffusion_shapes: list[str] = field(default_factory=list)
    lanes: tuple[str, ...] = ("llm", "diffusion", "attention")
    draft: str | None = None  # a draft model for speculative="draft"
    repeats: int = 10
    warmup: int = 2
    prompt_tokens: int = 128
    new_tokens: int = 128
    prefill_tokens: int = 2048
    agreement_tokens: int = 256  # greedy positions the precision-agreement table compares
    steps: int = 10
    image_repeats: int = 3
    image_size: int | None = None  # default: each diffusion model's own
    attention_seq: int = 4096
    attention_repeats: int = 10
    attention_kernels: tuple[str, ...] | None = None  # None: every kernel
    precisions: tuple[str, ...] | None = None  # None: every precision the device has
    # which rows to run (None: all that apply on the device); see LLM_ROWS and DIFFUSION_ROWS
    llm_rows: tuple[str, ...] | None = None
    diffusion_rows: tuple[str, ...] | None = None
    cacheless_tokens: int | None = None  # new tokens of the cache-off row (None: new_tokens; its cost is quadratic)
    threads: int | None = None  # torch CPU threads (None: torch's default)

    @classmethod
    def for_device(cls, device: str | None = None, quick: bool = False, **overrides) -> "Settings":
        """The suite's sizes for a device: ANCHORS' shapes on a GPU (prompt 128, 128 new tokens,
        prefill 2,048, attention S=4,096), smaller on the CPU; --quick makes everything small."""
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        settings = cls(device=device, quick=quick)
        if not device.startswith("cuda"):
            settings.attention_seq = 1024  # the eager kernel's score matrix still shows: 16 x 1024^2 floats
            settings.prefill_tokens = 512  # the CPU goal's prompt (issue 13)
            settings.cacheless_tokens = 32  # without a cache, 128 tokens re-run ~25k tokens: minutes per run
        if quick:
            settings.repeats, settings.warmup = 2, 1
            settings.prompt_tokens, settings.new_tokens, settings.prefill_tokens = 16, 8, 64
            settings.steps, settings.image_repeats, settings.attention_repeats = 3, 2, 2
            settings.agreement_tokens = 32
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        for rows, known in ((settings.llm_rows, LLM_ROWS), (settings.diffusion_rows, DIFFUSION_ROWS)):
            unknown = sorted(set(rows or ()) - set(known) - {"none"})
            if unknown:
                raise ValueError(f"unknown row kind {', '.join(unknown)}; the kinds are {', '.join(known)} (or none)")
        if not (settings.llm_models or settings.llm_shapes):
            settings.llm_models = [DEFAULT_LLM]
        if not (settings.diffusion_models or settings.diffusion_shapes):
            settings.diffusion_models = [DEFAULT_DIFFUSION]
        return settings


def wants(rows: tuple[str, ...] | None, kind: str) -> bool:
    """Whether Settings.llm_rows / diffusion_rows ask for rows of `kind` (None: every kind)."""
    return rows is None or kind in rows


class Results:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = torch.device(settings.device)
        self.tables: dict[str, list[dict]] = {name: [] for name in TABLES}
        self.models: list[dict] = []
        self.ceilings = None
        self.meta = {
            "command": None,  # set by `studio bench`
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "memory_method": PeakMemory.method(self.device),
            "quick": settings.quick,
            "settings": {k: v for k, v in asdict(settings).items()},
        }
        for package in ("transformers", "diffusers"):
            with contextlib.suppress(ImportError):
                self.meta[package] = __import__(package).__version__
        self.goals: list[dict] = []

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        """Results as a bench.json holds them (one run's, or several runs' tables merged, as
        scripts/gpu-check does), to evaluate the goals or write the report again; on any machine
        (nothing of the device it ran on is probed)."""
        known = {f.name for f in fields(Settings)}
        saved = {k: tuple(v) if isinstance(v, list) and k not in ("llm_models", "llm_shapes", "diffusion_models",
                                                                  "diffusion_shapes") else v
                 for k, v in data["meta"]["settings"].items() if k in known}
        results = cls.__new__(cls)
        results.settings = Settings(**saved)
        results.device = torch.device(results.settings.device)
        results.meta = dict(data["meta"])
        results.tables = {name: list(data["tables"].get(name, [])) for name in TABLES}
        results.models = list(data.get("models") or [])
        results.ceilings = Ceilings(**data["ceilings"]) if data.get("ceilings") else None
        results.goals = []
        return results

    def add(self, table: str, row: dict) -> dict:
        self.tables[table].append(row)
        return row

    def to_json(self) -> dict:
        return {
            "meta": self.meta,
            "ceilings": asdict(self.ceilings) if self.ceilings else None,
            "models": self.models,
            "tables": self.tables,
            "goals": self.goals,
        }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Rows: what every lane adds to the tables


def table_row(table: str, **values) -> dict:
    row = {column: None for column in COLUMNS[table]}
    row.update(values)
    return row


def or_failed(results: Results, table: str, base: dict, fn, *args):
    """fn(*args), or a "failed" row saying why: one broken workload never stops the suite."""
    try:
        return fn(*args)
    except Exception as error:
        if os.environ.get("STUDIO_BENCH_DEBUG"):
            traceback.print_exc()
        return results.add(table, table_row(table, status="failed", reason=first_line(error), **base))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def jsonable(value):
    return json.loads(json.dumps(value, default=str))


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------
# What a lane runs, and the ceilings its rows are held against


def matmul_peak(ceilings, dtype: str) -> float:
    """The matmul ceiling for a dtype; NaN (no share) where the device has none (fp8 on a CPU)."""
    return ceilings.peak_flops.get(dtype, math.nan)


def roofline_share(flops, nbytes, ms, ceilings, dtype):
    if not ms or flops is None or nbytes is None:
        return None
    try:
        return roofline(flops, nbytes, ms, ceilings, dtype).share
    except ValueError:
        return None


def peak_key(precision: str | None, dtype: torch.dtype) -> str:
    """The matmul ceiling a precision runs against: weight-only int8 multiplies in the activation dtype."""
    if precision in ("fp32", "tf32", "bf16", "fp16", "fp8"):
        return precision
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def attention_grid(settings: Settings, device, dtype, lane: str) -> list[tuple[str, str | None]]:
    """(kernel, reason it is skipped or None) for every attention kernel in a lane, the registered
    ones (plugins) after the built-ins."""
    grid = []
    for name in backends.attention_names():
        info = backends.attention_info(name, device, dtype)
        if settings.attention_kernels and name not in settings.attention_kernels and name != "auto":
            grid.append((name, "not asked for (--attention)"))
        elif not info.available:
            grid.append((name, info.reason))
        elif name == "flex" and lane == "llm":
            grid.append((name, "FlexAttention is compiled for fixed shapes (dynamic=False): every decode step has a "
                               "new KV length and would be timed compiling; see the prefill and attention tables"))
        elif settings.quick and name not in QUICK_ATTENTION:
            grid.append((name, f"--quick runs {', '.join(QUICK_ATTENTION)}; run without --quick for the rest"))
        else:
            grid.append((name, None))
    return grid


def precision_grid(settings: Settings, device, native: torch.dtype) -> list[tuple[str | None, str | None]]:
    """(precision or None for the model's own dtype, reason it is skipped or None), the
    registered ones (plugins) after the built-ins."""
    native_key = peak_key(None, native)
    grid = [(None, None)]
    for name in backends.precision_names():
        if name == native_key:
            continue  # the same as the model's own dtype
        info = backends.precision_info(name, device, native)
        if settings.precisions and name not in settings.precisions:
            grid.append((name, "not asked for (Settings.precisions)"))
        elif not info.available:
            grid.append((name, info.reason))
        elif settings.quick and device.type == "cpu" and name != "int8":
            grid.append((name, "--quick on the CPU runs the model's own dtype and int8 (CPUs rarely have fast "
                               f"{name} matmuls: see the probed ceilings); run without --quick"))
        else:
            grid.append((name, None))
    return grid
