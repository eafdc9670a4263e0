"""`studio bench`: both lanes side by side on this device, measured the same way, next to the stock
libraries and the device's roofline; written as JSON, CSV, a markdown table and PNG plots.

    results = run_suite(Settings.for_device("cpu", quick=True, llm_shapes=["tiny-llama"]))
    paths = write_results(results, "results/quick")

The tables, one row per workload:
    llm           the LLM lane per attention kernel, precision, KV cache on/off, fast path, speculative mode
                  (and per-token alternatives on/off), next to transformers' generate() on the same model
    prefill       one long prompt through the LLM: TFLOP/s and share of the matmul peak, per kernel
    diffusion     the diffusion lane per kernel, precision, CFG batched/sequential/off (and previews on/off),
                  next to the stock diffusers pipeline built from the same components
    attention     every attention kernel on one long causal sequence: time, TFLOP/s, peak memory
    side_by_side  prefill, decode, a denoising step and a VAE decode on this device's roofline
    inspector     what studio.inspector predicts from the config against what was measured
and `goals` lists the goals of the lane issues with the measured distance to each.

How it measures (the rules of shared/ANCHORS.md):
    - Warm-up runs come first and are untimed; their wall time (which holds any compiling and the
      FLOP counting) is reported apart, as warmup_ms.
    - Device time comes from studio.profiling.StepTimer: CUDA events on a GPU, queued with the work
      and read after it, so no timed region waits for the host. Wall-clock figures (time to first
      token, decode tokens/s) are what a user waits for, taken on the host around the whole call.
    - Every figure is the median over repeats, with the spread (min and max) next to it; each
      repeat gets other inputs (prompts, seeds, q/k/v tensors rotate).
    - Peak memory per workload: on a GPU torch.cuda.max_memory_allocated, reset before each
      workload; on the CPU the process's peak RSS (VmHWM), reset before each workload through
      /proc/self/clear_refs after a garbage collection and malloc_trim, so that the growth over the
      RSS at the workload's start is what the workload itself needed (tracemalloc would not see
      torch's allocations).
    - Rows that cannot run here are listed as skipped, with the reason; none is faked.

Like studio.cli, this module is a consumer of the lanes: it imports the pipelines, inside its
functions, which no other core module does. It never imports the UI.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import inspect as pyinspect
import json
import math
import os
import platform
import random
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter

import torch

from studio import backends
from studio import inspector
from studio.cost import decoder_step_cost
from studio.profiling import Measurement, StepTimer, ceilings_for, roofline

DEFAULT_LLM = "smollm2-135m"  # the shipped default models
DEFAULT_DIFFUSION = "fashion-dit"  # the shipped diffusion model (emoji-sd is not trained yet)
ROTATIONS = 3  # distinct input sets the timed repeats cycle through
TILED_MAX_BLOCK_PAIRS = 1024  # the tiled kernel is a Python loop over 64x64 blocks: beyond this, minutes per step
QUICK_ATTENTION = ("auto", "eager", "tiled")  # the kernels --quick runs in the lanes
QUICK_PREFILL = ("auto", "eager")
FAST_PATH_REASON = (
    "the GPU fast path (static KV cache + CUDA graphs, issue 9) is not implemented yet; this row runs once "
    "TextGenerationPipeline.stream takes fast_path=True"
)

COLUMNS = {
    "llm": [
        "model", "arch", "path", "attention", "precision", "dtype", "cache", "fast_path", "speculative",
        "top_logprobs", "status", "reason", "prompt_tokens", "new_tokens", "repeats", "warmup_ms",
        "ttft_ms", "ttft_ms_min", "ttft_ms_max", "prefill_ms", "prefill_tok_s", "prefill_tflop_s",
        "prefill_share_of_peak", "decode_tok_s", "decode_tok_s_min", "decode_tok_s_max", "decode_step_ms",
        "decode_gb_s", "decode_share_of_roofline", "speedup_vs_stock", "acceptance_rate", "run_ms", "paired_overhead",
        "weights_bytes", "kv_bytes", "kv_bytes_predicted", "activations_bytes", "peak_mem_bytes",
        "peak_growth_bytes",
    ],
    "prefill": [
        "model", "arch", "attention", "precision", "dtype", "tokens", "status", "reason", "repeats", "warmup_ms",
        "ms", "ms_min", "ms_max", "tok_s", "tflop_s", "share_of_peak", "scores_bytes", "peak_mem_bytes",
        "peak_growth_bytes",
    ],
    "diffusion": [
        "model", "arch", "path", "attention", "precision", "dtype", "cfg", "preview", "status", "reason", "image",
        "steps", "repeats", "warmup_ms", "step_ms", "step_ms_min", "step_ms_max", "it_s", "tflop_s",
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


# ---------------------------------------------------------------------------------------------
# Settings


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
    steps: int = 10
    image_repeats: int = 3
    image_size: int | None = None  # default: each diffusion model's own
    attention_seq: int = 4096
    attention_repeats: int = 10
    attention_kernels: tuple[str, ...] | None = None  # None: every kernel
    threads: int | None = None  # torch CPU threads (None: torch's default)

    @classmethod
    def for_device(cls, device: str | None = None, quick: bool = False, **overrides) -> "Settings":
        """The suite's sizes for a device: ANCHORS' shapes on a GPU (prompt 128, 128 new tokens,
        prefill 2,048, attention S=4,096), smaller on the CPU; --quick makes everything small."""
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        settings = cls(device=device, quick=quick)
        if not device.startswith("cuda"):
            settings.attention_seq = 1024  # the eager kernel's score matrix still shows: 16 x 1024^2 floats
        if quick:
            settings.repeats, settings.warmup = 2, 1
            settings.prompt_tokens, settings.new_tokens, settings.prefill_tokens = 16, 8, 64
            settings.steps, settings.image_repeats, settings.attention_repeats = 3, 2, 2
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        if not (settings.llm_models or settings.llm_shapes):
            settings.llm_models = [DEFAULT_LLM]
        if not (settings.diffusion_models or settings.diffusion_shapes):
            settings.diffusion_models = [DEFAULT_DIFFUSION]
        return settings


# ---------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_rotating(fn, inputs: list[tuple], device, warmup: int, repeats: int) -> Measurement:
    """Like studio.profiling.measure, but each run takes the next input set in turn, so that no
    run finds its inputs already in the cache from the run before."""
    timer = StepTimer(device)
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    timings = []
    for i in range(repeats):
        with timer.time() as timing:
            fn(*inputs[(warmup + i) % len(inputs)])
        timings.append(timing)
    all_ms = tuple(t.ms for t in timings)
    return Measurement(statistics.median(all_ms), min(all_ms), max(all_ms), all_ms)


def _malloc_trim() -> None:
    """Hand freed heap memory back to the OS, so the RSS is what is in use (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    return _status_kb("VmRSS")


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs (since 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """The peak memory of the enclosed workload.

    peak:   GPU: torch.cuda.max_memory_allocated (weights and everything else torch allocated);
            CPU: the process's peak RSS (VmHWM).
    growth: peak minus what was in use when the workload started: what the workload itself added.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: int | None = None
        self.growth: int | None = None
        self._sampler = None

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated, reset per workload (torch.cuda.reset_peak_memory_stats)"
        if device.type == "cpu":
            if _reset_peak_rss():
                return ("peak RSS of the process (VmHWM), reset per workload via /proc/self/clear_refs after "
                        "gc.collect() and malloc_trim(0); growth = peak - RSS at the workload's start")
            return "peak RSS of the process sampled every millisecond (VmHWM cannot be reset here)"
        return "not measured on this device type"

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            _malloc_trim()
            self._base = rss_bytes()
            if not _reset_peak_rss():
                self._sampler = _RssSampler()
                self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "cpu":
            self.peak = self._sampler.stop() if self._sampler else _status_kb("VmHWM")
        if self.peak is not None and self._base is not None:
            self.growth = max(0, self.peak - self._base)
        return False


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._stop = 0, threading.Event()

    def run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() or 0)
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self.join()
        return max(self.peak, rss_bytes() or 0)


class MemoryDelta:
    """Memory a block leaves allocated (e.g. a loaded model): the GPU's allocated bytes, or the
    process RSS, after minus before."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    def _now(self) -> int | None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        _malloc_trim()
        return rss_bytes()

    def __enter__(self):
        self._before = self._now()
        return self

    def __exit__(self, *exc):
        after = self._now()
        if after is not None and self._before is not None:
            self.bytes = after - self._before
        return False


def touch(module: torch.nn.Module | None) -> None:
    """Read every parameter once. safetensors files are memory-mapped: until a forward reads them,
    the weights are not resident and a memory measurement would miss them."""
    if module is None:
        return
    with torch.no_grad():
        for p in module.parameters():
            if p.device.type == "cpu" and p.numel():
                p.reshape(-1)[:: max(1, 4096 // p.element_size())].sum()  # one read per 4 kB page


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _quiet():
    """Silence the libraries' progress bars and advice while benchmarking."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*invalid value encountered.*")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _median_spread(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


# ---------------------------------------------------------------------------------------------
# Models: shipped, any path or hub id, or a reference shape with random weights


def byte_tokenizer(max_length: int | None = None):
    """A tokenizer needing no files: 256 byte tokens plus <eos> (256) and <pad> (257), so that a
    model built from a config (random weights, no tokenizer of its own) can be fed text. Any text
    of n ASCII characters is n tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kwargs = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", **kwargs)


def build_llm_shape(name: str, device, dtype: torch.dtype):
    """A TextGenerationPipeline over a reference config's architecture with random weights
    (transformers' own initialisation: non-zero) and the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipelines.text_generation import TextGenerationPipeline

    loaded = inspector.load_config(name)
    if loaded.kind != "llm":
        raise ValueError(f"{name} is a diffusion config; use it as a diffusion shape")
    fields = dict(loaded.config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if config.get_text_config().vocab_size < 258:
        raise ValueError(f"{name}: a vocabulary of {config.vocab_size} is too small for the byte tokenizer (258)")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return TextGenerationPipeline(model.to(device).eval(), byte_tokenizer(), device)


def build_diffusion_shape(name: str, device, dtype: torch.dtype):
    """A LatentDiffusionPipeline over a reference pipeline folder's architectures with random
    weights: the denoiser, the VAE and the text encoder from their configs, the scheduler from its
    config, and the byte tokenizer (the text encoder runs once per image and sets no figure here)."""
    import diffusers

    from pipelines.latent_diffusion import TRANSFORMER_PROMPT_TOKENS, LatentDiffusionPipeline

    loaded = inspector.load_config(name)
    if loaded.kind != "diffusion":
        raise ValueError(f"{name} is an LLM config; use it as an LLM shape")
    if "text_encoder_2" in loaded.components:
        raise ValueError(
            f"{name} has two text encoders (SDXL-style), which the diffusion lane does not run yet; "
            f"`studio inspect {name}` analyses it"
        )
    missing = [part for part in ("vae", "scheduler") if part not in loaded.components]
    if missing:
        raise ValueError(f"{name} has no {' or '.join(missing)} config: give a pipeline folder")

    def fields(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    with _default_dtype(dtype), torch.device(device):
        denoiser = inspector.diffusers_model_class(loaded.config).from_config(fields(loaded.config))
        vae = diffusers.AutoencoderKL.from_config(fields(loaded.components["vae"]))
    scheduler_config = loaded.components["scheduler"]
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(fields(scheduler_config))
    text_encoder = tokenizer = None
    if "text_encoder" in loaded.components:
        meta = inspector.text_encoder_on_meta(loaded.components["text_encoder"])
        with torch.device(device):
            text_encoder = type(meta)._from_config(meta.config, dtype=dtype)
        is_unet = isinstance(denoiser, diffusers.UNet2DConditionModel)
        tokens = loaded.components["text_encoder"].get("max_position_embeddings", 77) if is_unet else TRANSFORMER_PROMPT_TOKENS
        tokenizer = byte_tokenizer(max_length=tokens)
    text_encoder = text_encoder.to(device).eval() if text_encoder is not None else None
    return LatentDiffusionPipeline(
        denoiser.to(device).eval(), vae.to(device).eval(), scheduler, text_encoder, tokenizer, device=device
    )


def _reference_name(config: dict, kind: str) -> str | None:
    """The reference config whose architecture this config has, if any (for the goals)."""
    ignore = {"_name_or_path", "torch_dtype", "dtype", "transformers_version", "_diffusers_version", "architectures",
              "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "use_cache", "rope_scaling",
              "rope_parameters", "rope_theta", "initializer_range", "_class_name", "_use_default_values"}
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "n_embd", "n_layer", "block_out_channels", "num_layers", "attention_head_dim",
            "sample_size", "cross_attention_dim")
    for name, folder in inspector.reference_configs().items():
        try:
            reference = inspector.load_config(folder)
        except (ValueError, OSError):
            continue
        if reference.kind != kind:
            continue
        pairs = [(config.get(k), reference.config.get(k)) for k in keys if k in reference.config and k not in ignore]
        if pairs and all(_same(a, b) for a, b in pairs):
            return name
    return None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


# ---------------------------------------------------------------------------------------------
# Results


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


# ---------------------------------------------------------------------------------------------
# The suite


def run_suite(settings: Settings, progress: bool = True, verbose: bool = False) -> Results:
    """Run every workload the settings ask for and return the results (nothing is written)."""
    from tqdm import tqdm

    _quiet()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = Results(settings)
    device = results.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    results.ceilings = ceilings_for(device)
    results.meta["torch_threads"] = torch.get_num_threads()

    plan: list[tuple[str, object]] = []
    if "attention" in settings.lanes:
        plan += AttentionBench(settings, results).tasks()
    if "llm" in settings.lanes:
        for name in settings.llm_models:
            plan += LLMBench(settings, results, name, shape=False).tasks()
        for name in settings.llm_shapes:
            plan += LLMBench(settings, results, name, shape=True).tasks()
    if "diffusion" in settings.lanes:
        for name in settings.diffusion_models:
            plan += DiffusionBench(settings, results, name, shape=False).tasks()
        for name in settings.diffusion_shapes:
            plan += DiffusionBench(settings, results, name, shape=True).tasks()

    bar = tqdm(total=len(plan), desc="studio bench", unit="workload", file=sys.stderr, disable=not progress)
    results.meta["task_s"] = {}
    for label, task in plan:
        bar.set_postfix_str(label[:60])
        started = perf_counter()
        try:
            task()
        except Exception as error:  # a workload that breaks is reported, and the suite goes on
            if verbose:
                traceback.print_exc()
            print(f"studio bench: {label}: {_first_line(error)}", file=sys.stderr)
        results.meta["task_s"][label] = round(perf_counter() - started, 2)
        bar.update()
    bar.close()
    side_by_side(results)
    evaluate_goals(results)
    return results


def _row(table: str, **values) -> dict:
    row = {column: None for column in COLUMNS[table]}
    row.update(values)
    return row


def _or_failed(results: Results, table: str, base: dict, fn, *args):
    """fn(*args), or a "failed" row saying why: one broken workload never stops the suite."""
    try:
        return fn(*args)
    except Exception as error:
        if os.environ.get("STUDIO_BENCH_DEBUG"):
            traceback.print_exc()
        return results.add(table, _row(table, status="failed", reason=_first_line(error), **base))


def _peak(ceilings, dtype: str) -> float:
    """The matmul ceiling for a dtype; NaN (no share) where the device has none (fp8 on a CPU)."""
    return ceilings.peak_flops.get(dtype, math.nan)


def _share(flops, nbytes, ms, ceilings, dtype):
    if not ms or flops is None or nbytes is None:
        return None
    try:
        return roofline(flops, nbytes, ms, ceilings, dtype).share
    except ValueError:
        return None


def _peak_key(precision: str | None, dtype: torch.dtype) -> str:
    """The matmul ceiling a precision runs against: weight-only int8 multiplies in the activation dtype."""
    if precision in ("fp32", "tf32", "bf16", "fp16", "fp8"):
        return precision
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _attention_grid(settings: Settings, device, dtype, lane: str) -> list[tuple[str, str | None]]:
    """(kernel, reason it is skipped or None) for every attention kernel in a lane."""
    grid = []
    for name in backends.ATTENTION_BACKENDS:
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


def _precision_grid(settings: Settings, device, native: torch.dtype) -> list[tuple[str | None, str | None]]:
    """(precision or None for the model's own dtype, reason it is skipped or None)."""
    native_key = _peak_key(None, native)
    grid = [(None, None)]
    for name in backends.PRECISIONS:
        if name == native_key:
            continue  # the same as the model's own dtype
        info = backends.precision_info(name, device)
        if not info.available:
            grid.append((name, info.reason))
        elif settings.quick and device.type == "cpu" and name != "int8":
            grid.append((name, "--quick on the CPU runs the model's own dtype and int8 (CPUs rarely have fast "
                               f"{name} matmuls: see the probed ceilings); run without --quick"))
        else:
            grid.append((name, None))
    return grid


# --- attention kernels --------------------------------------------------------------------------


class AttentionBench:
    """Every kernel on one causal self-attention: B=1, H=16, D=64, S=4,096 fp16 on a GPU (as in
    ANCHORS) or S=1,024 fp32 on the CPU. The eager kernel's [B, H, S, S] score matrix shows in its
    peak memory; the flash, memory-efficient, SDPA and tiled kernels never build it."""

    BATCH, HEADS, HEAD_DIM = 1, 16, 64

    def __init__(self, settings: Settings, results: Results):
        self.settings, self.results = settings, results
        self.device = results.device
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32

    def tasks(self):
        return [(f"attention {name}", lambda name=name: self.run(name)) for name in self.kernels()]

    def kernels(self) -> list[str]:
        return list(backends.ATTENTION_BACKENDS)

    def run(self, name: str, seq: int | None = None, repeats: int | None = None, warmup: int | None = None) -> dict:
        s = self.settings
        seq = seq or s.attention_seq
        b, h, d = self.BATCH, self.HEADS, self.HEAD_DIM
        elem = torch.finfo(self.dtype).bits // 8
        base = dict(kernel=name, batch=b, heads=h, seq=seq, head_dim=d, causal=True, dtype=_dtype_name(self.dtype),
                    scores_bytes=b * h * seq * seq * elem, materialises_scores=name in ("eager", "sdpa-math"))
        info = backends.attention_info(name, self.device, self.dtype)
        reason = info.reason
        if reason is None and s.attention_kernels and name not in s.attention_kernels:
            reason = "not asked for (--attention)"
        if reason is None and s.quick and name == "flex" and self.device.type == "cpu":
            reason = "--quick: FlexAttention compiles each new shape with inductor (tens of seconds on a CPU)"
        if reason is not None:
            return self.results.add("attention", _row("attention", status="skipped", reason=reason, **base))
        return _or_failed(self.results, "attention", base, self._run, name, seq, repeats, warmup, base)

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
        return self.results.add("attention", _row(
            "attention", status="ok", resolved=resolved, repeats=len(m.all_ms), warmup_ms=warmup_ms, ms=m.median_ms,
            ms_min=m.min_ms, ms_max=m.max_ms, tflop_s=flops / m.median_ms / 1e9,
            share_of_peak=flops / (m.median_ms / 1e3) / _peak(self.results.ceilings, _dtype_name(self.dtype)),
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# --- the LLM lane -------------------------------------------------------------------------------

_WORDS = (
    "the river carried small boats past old mills while children counted clouds above green hills and a baker "
    "opened his shop to sell warm bread to travellers who had walked all night through quiet villages near the sea"
).split()


class LLMBench:
    """One LLM: every lane variant, the long prefill, and transformers' generate() next to them."""

    def __init__(self, settings: Settings, results: Results, name: str, shape: bool):
        self.settings, self.results, self.name, self.shape = settings, results, name, shape
        self.device = results.device
        self.llm = None
        self.error: str | None = None
        self.model_name = f"{name} (random weights)" if shape else name
        self.stock_tok_s: float | None = None

    # the plan: load, then one task per row, then free the model
    def tasks(self):
        s = self.settings
        tasks = [(f"load {self.model_name}", self.load)]
        tasks.append((f"{self.name}: generate()", lambda: self.stock(static=False)))
        if self.device.type == "cuda" and not s.quick:
            tasks.append((f"{self.name}: generate(static)", lambda: self.stock(static=True)))
        for variant in self.variants():
            tasks.append((f"{self.name}: {self._label(variant)}", lambda v=variant: self.decode_row(v)))
        tasks.append((f"{self.name}: prefill", self.prefill_rows))
        tasks.append((f"{self.name}: free", self.free))
        return tasks

    def variants(self) -> list[dict]:
        """The rows, as changes from the lane's default (auto kernel, the model's dtype, cache on,
        no fast path, plain decoding): each kernel, each precision, cache off, fast path, each
        speculative mode, and the per-token alternatives on (the events' cost)."""
        default = dict(attention="auto", precision=None, cache=True, fast_path=False, speculative=None, top_logprobs=0)
        rows = [dict(default)]
        dtype = self._dtype()
        for kernel, reason in _attention_grid(self.settings, self.device, dtype, "llm"):
            if kernel != "auto":
                rows.append(dict(default, attention=kernel, skip=reason))
        for precision, reason in _precision_grid(self.settings, self.device, dtype):
            if precision is not None:
                rows.append(dict(default, precision=precision, skip=reason))
        rows.append(dict(default, cache=False))
        fast_reason = None
        if self.device.type != "cuda":
            fast_reason = "the fast path (static KV cache + CUDA graphs) is for CUDA GPUs"
        elif "fast_path" not in pyinspect.signature(self._pipeline_class().stream).parameters:
            fast_reason = FAST_PATH_REASON
        rows.append(dict(default, fast_path=True, skip=fast_reason))
        rows.append(dict(default, speculative="prompt-lookup"))
        rows.append(dict(default, speculative="self"))
        rows.append(dict(default, speculative="draft",
                         skip=None if self.settings.draft else "no draft model: pass --draft MODEL (sharing the tokenizer)"))
        # paired: each timed run alternates with one without the alternatives, so drift hits both alike
        rows.append(dict(default, top_logprobs=5, paired={"top_logprobs": 0}))
        return rows

    @staticmethod
    def _pipeline_class():
        from pipelines.text_generation import TextGenerationPipeline

        return TextGenerationPipeline

    def _dtype(self) -> torch.dtype:
        if self.llm is not None:
            return next(self.llm.model.parameters()).dtype
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @staticmethod
    def _label(v: dict) -> str:
        parts = [f"attention={v['attention']}", f"precision={v['precision'] or 'native'}",
                 f"cache={'on' if v['cache'] else 'off'}"]
        if v["fast_path"]:
            parts.append("fast path")
        if v["speculative"]:
            parts.append(f"speculative={v['speculative']}")
        if v["top_logprobs"]:
            parts.append(f"top_logprobs={v['top_logprobs']}")
        return " ".join(parts)

    def load(self):
        TextGenerationPipeline = self._pipeline_class()
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            with MemoryDelta(self.device) as delta:
                if self.shape:
                    self.llm = build_llm_shape(self.name, self.device, dtype)
                else:
                    self._import_model_code()
                    self.llm = TextGenerationPipeline.from_pretrained(self.name, device=self.device)
                touch(self.llm.model)
        except (ValueError, OSError) as error:
            self.error = _first_line(error)
            raise
        llm = self.llm
        # a benchmark generates exactly new_tokens tokens, as generate(min_new_tokens=...) does
        llm.eos_token_ids = set()
        config = llm.model.config.to_dict()
        self.arch = self.name if self.shape else _reference_name(config, "llm")
        dtype_key = _dtype_name(self._dtype())
        self.analysis = inspector.analyse(
            config, device=self.results.ceilings, dtype=dtype_key, prompt_tokens=self.settings.prompt_tokens
        )
        self.weights_bytes = tensor_bytes(llm.model)
        self.results.models.append({
            "lane": "llm", "name": self.model_name, "source": "shape" if self.shape else "pretrained", "arch": self.arch,
            "dtype": dtype_key, "parameters": llm.model.num_parameters(), "weights_bytes": self.weights_bytes,
            "weights_bytes_loaded": delta.bytes, "config": _jsonable(config),
        })
        add = self.results.add
        add("inspector", _row("inspector", model=self.model_name, quantity="parameters", unit="count",
                              predicted=self.analysis.parameters, measured=llm.model.num_parameters(),
                              error=_error(self.analysis.parameters, llm.model.num_parameters()),
                              method="model.num_parameters() of the loaded model"))
        add("inspector", _row("inspector", model=self.model_name, quantity="weights", unit="bytes",
                              predicted=self.analysis.weight_bytes[dtype_key], measured=delta.bytes,
                              error=_error(self.analysis.weight_bytes[dtype_key], delta.bytes),
                              method=("allocated by loading (torch.cuda.memory_allocated after - before)"
                                      if self.device.type == "cuda" else "process RSS after loading - before")))

    def _import_model_code(self):
        """Import the model's transformers module before memory is measured: its code is not weights."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from studio import assets

        with contextlib.suppress(Exception):
            path = assets.resolve(self.name)
            config = AutoConfig.from_pretrained(path)
            AutoModelForCausalLM._model_mapping[type(config)]

    def free(self):
        self.llm = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _base(self, v: dict | None = None, path: str = "studio") -> dict:
        v = v or {}
        return dict(model=self.model_name, arch=getattr(self, "arch", None), path=path,
                    attention=v.get("attention", "sdpa" if path != "studio" else None),
                    precision=v.get("precision") or "native", dtype=_dtype_name(self._dtype()),
                    cache="on" if v.get("cache", True) else "off", fast_path="on" if v.get("fast_path") else "off",
                    speculative=v.get("speculative") or "none", top_logprobs=v.get("top_logprobs", 0),
                    prompt_tokens=self.settings.prompt_tokens, new_tokens=self.settings.new_tokens)

    def _not_loaded(self, table: str, base: dict) -> bool:
        if self.llm is None:
            self.results.add(table, _row(table, status="skipped", reason=f"the model did not load: {self.error}", **base))
            return True
        return False

    def _prompts(self) -> list[str]:
        """Prompts of about prompt_tokens tokens, a different one for every run."""
        s, tokenizer = self.settings, self.llm.tokenizer
        prompts = []
        for seed in range(s.warmup + s.repeats):
            rng = random.Random(seed)
            text = " ".join(rng.choice(_WORDS) for _ in range(2 * s.prompt_tokens))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][: s.prompt_tokens]
            prompts.append(tokenizer.decode(ids))
        return prompts

    def _draft(self, speculative):
        if speculative == "self":
            return max(1, self.llm.shape.layers // 4)
        if speculative == "draft":
            if not hasattr(self, "_draft_llm"):
                self._draft_llm = self._pipeline_class().from_pretrained(self.settings.draft, device=self.device)
            return self._draft_llm
        return None

    def decode_row(self, v: dict) -> dict:
        base = self._base(v)
        if self._not_loaded("llm", base):
            return None
        if v.get("skip"):
            return self.results.add("llm", _row("llm", status="skipped", reason=v["skip"], **base))
        return _or_failed(self.results, "llm", base, self._decode_row, v, base)

    def _decode_row(self, v: dict, base: dict) -> dict:
        s, llm = self.settings, self.llm
        llm.attention, llm.precision = v["attention"], v["precision"]
        kwargs = dict(max_new_tokens=s.new_tokens, use_cache=v["cache"], top_logprobs=v["top_logprobs"],
                      speculative=v["speculative"], draft=self._draft(v["speculative"]))
        if v["fast_path"]:
            kwargs["fast_path"] = True
        prompts = self._prompts()
        # --quick warms up on two new tokens: prefill and decode have run once, which is what warm-up is for
        warm = dict(kwargs, max_new_tokens=min(2, s.new_tokens)) if s.quick else kwargs
        try:
            started = perf_counter()
            for prompt in prompts[: s.warmup]:
                self._generate(prompt, warm)
            warmup_ms = (perf_counter() - started) * 1e3
            with PeakMemory(self.device) as memory:
                runs, off = [], []
                for prompt in prompts[s.warmup:]:
                    if v.get("paired"):
                        off.append(self._generate(prompt, dict(kwargs, **v["paired"])))
                    runs.append(self._generate(prompt, kwargs))
        finally:
            llm.attention, llm.precision = None, None
        ceilings, dtype = self.results.ceilings, _peak_key(v["precision"], self._dtype())
        ttft, _, _ = _median_spread([r["ttft_ms"] for r in runs])
        tok_s, tok_s_min, tok_s_max = _median_spread([r["decode_tok_s"] for r in runs])
        prefill_ms = statistics.median(r["prefill_ms"] for r in runs)
        prefill_flops = runs[0]["prefill_flops"]
        prompt_len = runs[0]["prompt_len"]
        # bytes one plain decode step moves per token (weights, KV cache, logits), mid-generation
        flops_tok, bytes_tok = decoder_step_cost(llm.shape, 1, 1, prompt_len + s.new_tokens // 2)
        bytes_tok = bytes_tok * _bytes_scale(llm, v["precision"])
        step_ms = 1e3 / tok_s if tok_s else None
        kv_tokens = prompt_len + s.new_tokens - 1
        plain = v["cache"] and not v["speculative"]
        row = self.results.add("llm", _row(
            "llm", status="ok", repeats=len(runs), warmup_ms=warmup_ms,
            ttft_ms=ttft, ttft_ms_min=min(r["ttft_ms"] for r in runs), ttft_ms_max=max(r["ttft_ms"] for r in runs),
            prefill_ms=prefill_ms, prefill_tok_s=prompt_len / prefill_ms * 1e3,
            prefill_tflop_s=prefill_flops / prefill_ms / 1e9,
            prefill_share_of_peak=prefill_flops / (prefill_ms / 1e3) / _peak(ceilings, dtype),
            decode_tok_s=tok_s, decode_tok_s_min=tok_s_min, decode_tok_s_max=tok_s_max,
            decode_step_ms=_median_spread([r["decode_step_ms"] for r in runs])[0],
            decode_gb_s=bytes_tok * tok_s / 1e9 if tok_s else None,
            decode_share_of_roofline=_share(flops_tok, bytes_tok, step_ms, ceilings, dtype),
            acceptance_rate=_median_spread([r["acceptance_rate"] for r in runs])[0],
            run_ms=statistics.median(r["run_ms"] for r in runs),
            paired_overhead=_overhead(runs, off, "run_ms"),
            weights_bytes=self.weights_bytes,
            kv_bytes=runs[-1]["kv_bytes"] if v["cache"] else 0,
            kv_bytes_predicted=self.analysis.kv_bytes_per_token * kv_tokens if plain else None,
            activations_bytes=inspector.decoder_activation_bytes(
                self.analysis, 1 if v["cache"] else prompt_len + s.new_tokens, prompt_len + s.new_tokens,
                eager=v["attention"] == "eager"),
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))
        if self.stock_tok_s and tok_s:
            row["speedup_vs_stock"] = tok_s / self.stock_tok_s
        if v == self.variants()[0]:
            row["_cost"] = {"prefill": (prefill_flops, runs[0]["prefill_bytes"]), "decode": (flops_tok, bytes_tok)}
            self._inspect_decode(row, runs, kv_tokens)
        return row

    def _generate(self, prompt: str, kwargs: dict) -> dict:
        """One generation, timed on the host (time to first token, decode tokens/s) and from the
        events (device time of prefill and of each decode step)."""
        started = perf_counter()
        first, events = None, []
        for event in self.llm.stream(prompt, **kwargs):
            if first is None and event.phase in ("prefill", "decode"):
                first = perf_counter()
            events.append(event)
        synchronize(self.device)
        total = perf_counter() - started
        tokens = [e for e in events if e.phase in ("prefill", "decode")]
        prefill = next(e for e in events if e.phase == "prefill")
        decode_ms = [e.ms for e in events if e.phase == "decode" and e.timing is not None]
        drafted = [e.drafted for e in events if e.drafted is not None]
        accepted = sum(1 for e in events if e.from_draft)
        return {
            "ttft_ms": (first - started) * 1e3,
            "decode_tok_s": (len(tokens) - 1) / (total - (first - started)) if len(tokens) > 1 else None,
            "decode_step_ms": statistics.median(decode_ms) if decode_ms and not drafted else None,
            "prefill_ms": prefill.ms, "prefill_flops": prefill.flops, "prefill_bytes": prefill.bytes,
            "prompt_len": len(events[0].token_ids),
            "kv_bytes": tokens[-1].kv_cache_bytes,
            "acceptance_rate": accepted / max(1, sum(len(d) for d in drafted)) if drafted else None,
            "run_ms": total * 1e3,
        }

    def _inspect_decode(self, row: dict, runs: list[dict], kv_tokens: int):
        """Predicted against measured for the default row: KV cache, peak, time per step."""
        a, add, name = self.analysis, self.results.add, self.model_name
        measured_per_token = row["kv_bytes"] / kv_tokens if row["kv_bytes"] else None
        add("inspector", _row("inspector", model=name, quantity="KV cache per token", unit="bytes",
                              predicted=a.kv_bytes_per_token, measured=measured_per_token,
                              error=_error(a.kv_bytes_per_token, measured_per_token),
                              method=f"kv_cache_bytes of the last event / {kv_tokens} cached tokens"))
        add("inspector", _row("inspector", model=name, quantity=f"KV cache, {kv_tokens} tokens", unit="bytes",
                              predicted=row["kv_bytes_predicted"], measured=row["kv_bytes"],
                              error=_error(row["kv_bytes_predicted"], row["kv_bytes"]),
                              method="the lane's kv_cache_bytes: its key and value tensors as allocated"))
        predicted_peak = self.weights_bytes + (row["kv_bytes_predicted"] or 0) + row["activations_bytes"]
        if self.device.type == "cuda":
            add("inspector", _row("inspector", model=name, quantity="decode peak memory", unit="bytes",
                                  predicted=predicted_peak, measured=row["peak_mem_bytes"],
                                  error=_error(predicted_peak, row["peak_mem_bytes"]),
                                  method="weights + KV + activations (estimate) vs torch.cuda.max_memory_allocated"))
        else:
            extra = (row["kv_bytes_predicted"] or 0) + row["activations_bytes"]
            add("inspector", _row("inspector", model=name, quantity="decode memory growth", unit="bytes",
                                  predicted=extra, measured=row["peak_growth_bytes"],
                                  error=_error(extra, row["peak_growth_bytes"]),
                                  method="KV + activations (estimate) vs peak RSS growth (weights were resident before)"))
        # the roofline's time on this device, against the measured device time
        prefill = a.predicted(self.results.ceilings.name, "prefill").ms
        decode = a.predicted(self.results.ceilings.name, "decode").ms
        add("inspector", _row("inspector", model=name, quantity="prefill time", unit="ms", predicted=prefill,
                              measured=row["prefill_ms"], error=_error(prefill, row["prefill_ms"]),
                              method="roofline on this device's ceilings vs the prefill event's device time"))
        add("inspector", _row("inspector", model=name, quantity="decode time per token", unit="ms", predicted=decode,
                              measured=1e3 / row["decode_tok_s"] if row["decode_tok_s"] else None,
                              error=_error(decode, 1e3 / row["decode_tok_s"] if row["decode_tok_s"] else None),
                              method="roofline on this device's ceilings vs 1 / decode tokens per second (wall clock)"))

    def stock(self, static: bool) -> dict:
        """transformers' generate(), greedy, on the same model and prompts, with its own SDPA attention:
        time to first token from a streamer, decode tokens/s as (new tokens - 1) / (total - TTFT)."""
        path = "transformers generate(static cache)" if static else "transformers generate()"
        base = self._base(path=path)
        if self._not_loaded("llm", base):
            return None
        return _or_failed(self.results, "llm", base, self._stock, static, base, path)

    def _stock(self, static: bool, base: dict, path: str) -> dict:
        from studio.integrations.transformers import use_studio_attention

        s, llm = self.settings, self.llm
        backends.restore_precision(llm.model)
        llm.model.set_attn_implementation("sdpa")
        prompts = self._prompts()
        try:
            started = perf_counter()
            for prompt in prompts[: s.warmup]:
                self._stock_generate(prompt, static)
            warmup_ms = (perf_counter() - started) * 1e3
            with PeakMemory(self.device) as memory:
                runs = [self._stock_generate(prompt, static) for prompt in prompts[s.warmup:]]
        finally:
            use_studio_attention(llm.model)
        tok_s, tok_s_min, tok_s_max = _median_spread([r["decode_tok_s"] for r in runs])
        if not static:
            self.stock_tok_s = tok_s
            for row in self.results.tables["llm"]:  # rows measured before this one
                if row["model"] == self.model_name and row["path"] == "studio" and row["decode_tok_s"] and tok_s:
                    row["speedup_vs_stock"] = row["decode_tok_s"] / tok_s
        prompt_len = runs[0]["prompt_len"]
        flops_tok, bytes_tok = decoder_step_cost(llm.shape, 1, 1, prompt_len + s.new_tokens // 2)
        dtype = _peak_key(None, self._dtype())
        return self.results.add("llm", _row(
            "llm", status="ok", repeats=len(runs), warmup_ms=warmup_ms,
            ttft_ms=_median_spread([r["ttft_ms"] for r in runs])[0],
            ttft_ms_min=min(r["ttft_ms"] for r in runs), ttft_ms_max=max(r["ttft_ms"] for r in runs),
            decode_tok_s=tok_s, decode_tok_s_min=tok_s_min, decode_tok_s_max=tok_s_max,
            decode_gb_s=bytes_tok * tok_s / 1e9 if tok_s else None,
            decode_share_of_roofline=_share(flops_tok, bytes_tok, 1e3 / tok_s if tok_s else None,
                                            self.results.ceilings, dtype),
            speedup_vs_stock=1.0 if not static else (tok_s / self.stock_tok_s if self.stock_tok_s and tok_s else None),
            run_ms=statistics.median(r["run_ms"] for r in runs), weights_bytes=self.weights_bytes,
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))

    def _stock_generate(self, prompt: str, static: bool) -> dict:
        from transformers import GenerationConfig
        from transformers.generation.streamers import BaseStreamer

        llm, n = self.llm, self.settings.new_tokens

        class FirstToken(BaseStreamer):
            """generate() hands the streamer the prompt, then each new token (already on the host)."""

            def __init__(self):
                self.puts, self.first = 0, None

            def put(self, value):
                self.puts += 1
                if self.puts == 2:
                    self.first = perf_counter()

            def end(self):
                pass

        streamer = FirstToken()
        # greedy, exactly n new tokens; a fresh config, so that no sampling default of the model applies
        config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=llm.pad_token_id,
                                  eos_token_id=llm.model.generation_config.eos_token_id,
                                  cache_implementation="static" if static else None)
        started = perf_counter()
        encoded = llm.tokenizer(prompt, return_tensors="pt").to(self.device)  # timed, as the lane's tokenize is
        with torch.no_grad():
            out = llm.model.generate(**encoded, generation_config=config, streamer=streamer)
        synchronize(self.device)
        total = perf_counter() - started
        new = out.shape[1] - encoded["input_ids"].shape[1]
        ttft = streamer.first - started
        return {"ttft_ms": ttft * 1e3, "decode_tok_s": (new - 1) / (total - ttft) if new > 1 else None,
                "prompt_len": encoded["input_ids"].shape[1], "run_ms": total * 1e3}

    def prefill_rows(self):
        """One forward over prefill_tokens tokens (filling a fresh KV cache), per attention kernel and
        precision: TFLOP/s and share of the matmul peak. Device time from CUDA events."""
        s = self.settings
        dtype = self._dtype()
        variants = [(k, None, r) for k, r in _attention_grid(s, self.device, dtype, "prefill")]
        variants += [("auto", p, r) for p, r in _precision_grid(s, self.device, dtype) if p is not None]
        if s.quick:  # the default kernel, and eager for its score matrix
            variants = [(k, p, r if r or (k in QUICK_PREFILL and p is None) else
                         f"--quick runs the prefill with {' and '.join(QUICK_PREFILL)} only; run without --quick")
                        for k, p, r in variants]
        for kernel, precision, reason in variants:
            base = dict(model=self.model_name, arch=getattr(self, "arch", None), attention=kernel,
                        precision=precision or "native", dtype=_dtype_name(dtype), tokens=s.prefill_tokens)
            if self._not_loaded("prefill", base):
                continue
            if reason is None and self.llm.context_length and s.prefill_tokens > self.llm.context_length:
                reason = f"the model's context is {self.llm.context_length} tokens"
            if reason is None and kernel == "tiled" and (s.prefill_tokens // 64) ** 2 // 2 > TILED_MAX_BLOCK_PAIRS:
                reason = (f"the tiled kernel is a Python loop over 64x64 blocks: {(s.prefill_tokens // 64) ** 2 // 2:,} "
                          "block pairs per layer; see the attention table for it")
            if reason is not None:
                self.results.add("prefill", _row("prefill", status="skipped", reason=reason, **base))
                continue
            try:
                self._prefill_row(kernel, precision, base)
            except Exception as error:
                self.results.add("prefill", _row("prefill", status="failed", reason=_first_line(error), **base))

    def _prefill_row(self, kernel, precision, base):
        from transformers import DynamicCache

        s, llm = self.settings, self.llm
        vocab = min(llm.shape.vocab, len(llm.tokenizer))
        generator = torch.Generator().manual_seed(0)
        inputs = [(torch.randint(0, vocab, (1, s.prefill_tokens), generator=generator).to(self.device),)
                  for _ in range(ROTATIONS)]

        def prefill(ids):
            cache = DynamicCache(config=llm.model.config)
            llm.prefill(ids, torch.ones_like(ids), cache)

        if precision:
            backends.apply_precision(llm.model, precision)
        try:
            with backends.use(attention=kernel):
                started = perf_counter()
                prefill(*inputs[0])
                synchronize(self.device)
                warmup_ms = (perf_counter() - started) * 1e3
                with PeakMemory(self.device) as memory:
                    m = measure_rotating(prefill, inputs, self.device, max(0, s.warmup - 1), s.repeats)
        finally:
            backends.restore_precision(llm.model)
        flops, _ = decoder_step_cost(llm.shape, 1, s.prefill_tokens, s.prefill_tokens)
        dtype = _peak_key(precision, self._dtype())
        self.results.add("prefill", _row(
            "prefill", status="ok", repeats=len(m.all_ms), warmup_ms=warmup_ms, ms=m.median_ms, ms_min=m.min_ms,
            ms_max=m.max_ms, tok_s=s.prefill_tokens / m.median_ms * 1e3, tflop_s=flops / m.median_ms / 1e9,
            share_of_peak=flops / (m.median_ms / 1e3) / _peak(self.results.ceilings, dtype),
            scores_bytes=llm.shape.heads * s.prefill_tokens**2 * 4 if kernel in ("eager", "sdpa-math") else 0,
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))


def _bytes_scale(llm, precision: str | None) -> float:
    """Weight bytes per decode step change with the precision: 1-byte int8/fp8, 2-byte bf16/fp16."""
    if precision is None:
        return 1.0
    size = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}[precision]
    return size / llm.shape.dtype_bytes


def _overhead(runs: list[dict], off: list[dict], key: str) -> float | None:
    """Median wall time with the feature over the median without it, minus 1 (runs paired in time)."""
    if not off:
        return None
    return statistics.median(r[key] for r in runs) / statistics.median(r[key] for r in off) - 1


def _error(predicted, measured) -> float | None:
    """measured / predicted - 1: +0.05 means 5 % more than predicted."""
    if predicted in (None, 0) or measured is None:
        return None
    return measured / predicted - 1


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# --- the diffusion lane -------------------------------------------------------------------------

_IMAGE_PROMPTS = ["a red apple on a table", "a lighthouse at dusk", "a cat wearing a hat", "a bowl of ramen"]
_CLASS_PROMPTS = ["207", "360", "387", "974"]  # class ids: DiT-style models take a class, not text


class DiffusionBench:
    """One diffusion model: every lane variant, and the stock diffusers pipeline next to them."""

    def __init__(self, settings: Settings, results: Results, name: str, shape: bool):
        self.settings, self.results, self.name, self.shape = settings, results, name, shape
        self.device = results.device
        self.pipe = None
        self.error: str | None = None
        self.model_name = f"{name} (random weights)" if shape else name
        self.stock_step_ms: float | None = None

    def tasks(self):
        tasks = [(f"load {self.model_name}", self.load), (f"{self.name}: stock diffusers", self.stock)]
        for variant in self.variants():
            tasks.append((f"{self.name}: {self._label(variant)}", lambda v=variant: self.row(v)))
        tasks.append((f"{self.name}: free", self.free))
        return tasks

    def variants(self) -> list[dict]:
        default = dict(attention="auto", precision=None, cfg="batched", preview=None)
        rows = [dict(default)]
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        for kernel, reason in _attention_grid(self.settings, self.device, dtype, "diffusion"):
            if kernel != "auto":
                rows.append(dict(default, attention=kernel, skip=reason))
        for precision, reason in _precision_grid(self.settings, self.device, dtype):
            if precision is not None:
                rows.append(dict(default, precision=precision, skip=reason))
        rows.append(dict(default, cfg="sequential"))
        rows.append(dict(default, cfg="off"))
        rows.append(dict(default, preview="linear", paired={"preview": None}))
        return rows

    @staticmethod
    def _label(v: dict) -> str:
        return (f"attention={v['attention']} precision={v['precision'] or 'native'} cfg={v['cfg']}"
                + (f" preview={v['preview']}" if v["preview"] else ""))

    def load(self):
        from studio import assets

        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if not self.shape and self.name == DEFAULT_DIFFUSION and self.name not in assets.list_models("diffusion"):
            self.error = (f"the shipped default diffusion model {self.name!r} is not in assets/manifest.json yet "
                          "(not trained yet); pass --diffusion MODEL or --shape NAME")
            raise ValueError(self.error)
        try:
            with MemoryDelta(self.device) as delta:
                if self.shape:
                    self.pipe = build_diffusion_shape(self.name, self.device, dtype)
                else:
                    from pipelines.latent_diffusion import LatentDiffusionPipeline

                    self.pipe = LatentDiffusionPipeline.from_pretrained(self.name, device=self.device)
                for model in (self.pipe.denoiser, self.pipe.vae, self.pipe.text_encoder):
                    touch(model)
        except (ValueError, OSError) as error:
            self.error = _first_line(error)
            raise
        pipe = self.pipe
        config = {"_class_name": type(pipe.denoiser).__name__, **dict(pipe.denoiser.config)}
        components = {"vae": {"_class_name": type(pipe.vae).__name__, **dict(pipe.vae.config)}}
        if pipe.text_encoder is not None:
            components["text_encoder"] = pipe.text_encoder.config.to_dict()
            components["text_encoder"]["architectures"] = [type(pipe.text_encoder).__name__]
        self.arch = self.name if self.shape else _reference_name(config, "diffusion")
        size = self.settings.image_size
        self.image = (size, size) if size else pipe.default_size
        self.analysis = inspector.analyse(
            inspector.ModelConfig(self.model_name, "diffusion", _jsonable(config), _jsonable(components)),
            device=self.results.ceilings, dtype=_dtype_name(pipe.dtype), image_size=self.image,
        )
        self.weights_bytes = tensor_bytes(pipe.denoiser)
        predicted_all = self.analysis.weight_bytes[self.analysis.dtype] + sum(self.analysis.component_bytes.values())
        self.results.models.append({
            "lane": "diffusion", "name": self.model_name, "source": "shape" if self.shape else "pretrained",
            "arch": self.arch, "dtype": self.analysis.dtype, "parameters": pipe.denoiser.num_parameters(),
            "weights_bytes": self.weights_bytes, "pipeline_bytes_loaded": delta.bytes, "config": _jsonable(config),
        })
        add, name = self.results.add, self.model_name
        add("inspector", _row("inspector", model=name, quantity="denoiser parameters", unit="count",
                              predicted=self.analysis.parameters, measured=pipe.denoiser.num_parameters(),
                              error=_error(self.analysis.parameters, pipe.denoiser.num_parameters()),
                              method="num_parameters() of the loaded denoiser"))
        add("inspector", _row("inspector", model=name, quantity="pipeline weights (denoiser, VAE, text encoder)",
                              unit="bytes", predicted=predicted_all, measured=delta.bytes,
                              error=_error(predicted_all, delta.bytes),
                              method=("allocated by loading (torch.cuda.memory_allocated after - before)"
                                      if self.device.type == "cuda" else "process RSS after loading - before")))

    def free(self):
        self.pipe = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _base(self, v: dict | None = None, path: str = "studio") -> dict:
        v = v or {}
        dtype = self.pipe.dtype if self.pipe is not None else None
        image = getattr(self, "image", None)
        return dict(model=self.model_name, arch=getattr(self, "arch", None), path=path,
                    attention=v.get("attention", "sdpa (AttnProcessor2_0)" if path != "studio" else None),
                    precision=v.get("precision") or "native", dtype=_dtype_name(dtype) if dtype else None,
                    cfg=v.get("cfg", "batched"), preview=v.get("preview") or "none",
                    image=f"{image[0]}x{image[1]}" if image else None, steps=self.settings.steps)

    def _prompts(self) -> list[str]:
        prompts = _CLASS_PROMPTS if self.pipe.conditioning == "class" else _IMAGE_PROMPTS
        if self.pipe.conditioning == "class":
            null = self.pipe.denoiser.config.num_embeds_ada_norm
            prompts = [str(int(p) % null) for p in prompts]
        return prompts

    def row(self, v: dict):
        base = self._base(v)
        if self.pipe is None:
            return self.results.add("diffusion", _row("diffusion", status="skipped",
                                                      reason=f"the model did not load: {self.error}", **base))
        if v.get("skip"):
            return self.results.add("diffusion", _row("diffusion", status="skipped", reason=v["skip"], **base))
        return _or_failed(self.results, "diffusion", base, self._row, v, base)

    def _row(self, v: dict, base: dict) -> dict:
        s, pipe = self.settings, self.pipe
        if v["attention"] == "tiled":
            pairs = max(self._attention_pairs(), default=0)
            if pairs > TILED_MAX_BLOCK_PAIRS:
                return self.results.add("diffusion", _row("diffusion", status="skipped", reason=(
                    f"the tiled kernel is a Python loop over 64x64 blocks: {pairs:,} block pairs in the largest "
                    "attention call; see the attention table for it"), **base))
        pipe.attention, pipe.precision = v["attention"], v["precision"]
        kwargs = dict(steps=s.steps, guidance_scale=1.0 if v["cfg"] == "off" else 5.0,
                      cfg_mode="batched" if v["cfg"] == "off" else v["cfg"], preview=v["preview"],
                      height=self.image[0], width=self.image[1])
        prompts = self._prompts()
        try:
            started = perf_counter()
            self._imagine(prompts[0], 0, kwargs)  # warm-up: FLOP counting and one-off set-up
            warmup_ms = (perf_counter() - started) * 1e3
            with PeakMemory(self.device) as memory:
                runs, off = [], []
                for i in range(s.image_repeats):
                    prompt = prompts[(i + 1) % len(prompts)]
                    if v.get("paired"):
                        off.append(self._imagine(prompt, i + 1, dict(kwargs, **v["paired"])))
                    runs.append(self._imagine(prompt, i + 1, kwargs))
        finally:
            pipe.attention, pipe.precision = None, None
        steps_ms = [ms for r in runs for ms in r["step_ms"]]
        step_ms, step_min, step_max = _median_spread(steps_ms)
        flops = runs[0]["step_flops"]
        vae_ms = statistics.median(r["vae_ms"] for r in runs)
        dtype = _peak_key(v["precision"], pipe.dtype)
        row = self.results.add("diffusion", _row(
            "diffusion", status="ok", repeats=len(runs), warmup_ms=warmup_ms, step_ms=step_ms, step_ms_min=step_min,
            step_ms_max=step_max, it_s=1e3 / step_ms, tflop_s=flops / step_ms / 1e9,
            share_of_peak=flops / (step_ms / 1e3) / _peak(self.results.ceilings, dtype), vae_decode_ms=vae_ms,
            vae_tflop_s=runs[0]["vae_flops"] / vae_ms / 1e9 if vae_ms else None,
            image_ms=statistics.median(r["image_ms"] for r in runs), paired_overhead=_overhead(runs, off, "image_ms"),
            weights_bytes=self.weights_bytes, peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))
        if self.stock_step_ms and v["cfg"] == "batched":
            row["speedup_vs_stock"] = self.stock_step_ms / step_ms
        if v == self.variants()[0]:
            row["_cost"] = {"denoise step": (flops, runs[0]["step_bytes"]),
                            "vae decode": (runs[0]["vae_flops"], runs[0]["vae_bytes"])}
            self._inspect(row, flops)
        return row

    def _attention_pairs(self) -> list[int]:
        shape = self.analysis.attention_scores_shape
        if not shape:
            return []
        return [math.ceil(shape[2] / 64) * math.ceil(shape[3] / 64)]

    def _imagine(self, prompt: str, seed: int, kwargs: dict) -> dict:
        started = perf_counter()
        events = list(self.pipe.stream(prompt, seed=seed, **kwargs))
        synchronize(self.device)
        total = perf_counter() - started
        denoise = [e for e in events if e.phase == "denoise"]
        decode = next(e for e in events if e.phase == "decode")
        timed = [e for e in denoise if not e.warmup] or denoise  # the first step holds one-off set-up
        return {"step_ms": [e.ms for e in timed], "step_flops": denoise[-1].flops, "step_bytes": denoise[-1].bytes,
                "vae_ms": decode.parts["vae"].ms, "vae_flops": decode.flops, "vae_bytes": decode.bytes,
                "image_ms": total * 1e3}

    def _inspect(self, row: dict, step_flops: int):
        a, add, name, device = self.analysis, self.results.add, self.model_name, self.results.ceilings.name
        step = a.predicted(device, "denoise step").ms
        add("inspector", _row("inspector", model=name, quantity="denoise step time (CFG)", unit="ms", predicted=step,
                              measured=row["step_ms"], error=_error(step, row["step_ms"]),
                              method="roofline on this device's ceilings vs the denoise events' device time"))
        if any(w.name == "vae decode" for w in a.workloads):
            vae = a.predicted(device, "vae decode").ms
            add("inspector", _row("inspector", model=name, quantity="VAE decode time", unit="ms", predicted=vae,
                                  measured=row["vae_decode_ms"], error=_error(vae, row["vae_decode_ms"]),
                                  method="roofline on this device's ceilings vs the decode event's VAE time"))
        add("inspector", _row("inspector", model=name, quantity="denoise step FLOPs", unit="FLOP",
                              predicted=a.workload("denoise step").flops, measured=step_flops,
                              error=_error(a.workload("denoise step").flops, step_flops),
                              method="FlopCounterMode on the meta device vs on the real run (the lane's events)"))

    def stock(self):
        """The stock diffusers pipeline (StableDiffusionPipeline, DiTPipeline or PixArtAlphaPipeline)
        built from the same components, with diffusers' own SDPA attention processors. Per step: the
        device time from the denoiser's start to the end of the scheduler's step (CUDA events
        recorded by hooks, no sync); the VAE decode likewise."""
        base = self._base(path="stock diffusers")
        if self.pipe is None:
            return self.results.add("diffusion", _row("diffusion", status="skipped",
                                                      reason=f"the model did not load: {self.error}", **base))
        return _or_failed(self.results, "diffusion", base, self._stock, base)

    def _stock(self, base: dict) -> dict:
        s, pipe = self.settings, self.pipe
        try:
            stock, call = self._stock_pipeline()
        except ValueError as error:
            return self.results.add("diffusion", _row("diffusion", status="skipped", reason=str(error), **base))
        clock = _Marks(self.device)
        hooks = [pipe.denoiser.register_forward_pre_hook(lambda *a: clock.mark("step"))]
        scheduler_step, vae_decode = stock.scheduler.step, pipe.vae.decode

        def step(*args, **kwargs):
            out = scheduler_step(*args, **kwargs)
            clock.mark("step end")
            return out

        def decode(*args, **kwargs):
            clock.mark("vae")
            out = vae_decode(*args, **kwargs)
            clock.mark("vae end")
            return out

        stock.scheduler.step, pipe.vae.decode = step, decode
        self._stock_attention()
        prompts = self._prompts()
        try:
            started = perf_counter()
            call(prompts[0], 0)
            synchronize(self.device)
            warmup_ms = (perf_counter() - started) * 1e3
            runs = []
            with PeakMemory(self.device) as memory:
                for i in range(s.image_repeats):
                    clock.clear()
                    started = perf_counter()
                    call(prompts[(i + 1) % len(prompts)], i + 1)
                    synchronize(self.device)
                    runs.append(((perf_counter() - started) * 1e3, clock.spans("step", "step end"),
                                 clock.spans("vae", "vae end")))
        finally:
            for hook in hooks:
                hook.remove()
            del pipe.vae.decode  # the instance attribute; the class's method shows again
            self._studio_attention()
        steps_ms = [ms for _, spans, _ in runs for ms in spans[1:] or spans]  # the first step holds set-up
        step_ms, step_min, step_max = _median_spread(steps_ms)
        vae_ms = statistics.median(spans[0] for _, _, spans in runs if spans)
        self.stock_step_ms = step_ms
        for row in self.results.tables["diffusion"]:
            if row["model"] == self.model_name and row["path"] == "studio" and row["cfg"] == "batched" and row["step_ms"]:
                row["speedup_vs_stock"] = step_ms / row["step_ms"]
        return self.results.add("diffusion", _row(
            "diffusion", status="ok", repeats=len(runs), warmup_ms=warmup_ms, step_ms=step_ms, step_ms_min=step_min,
            step_ms_max=step_max, it_s=1e3 / step_ms, vae_decode_ms=vae_ms,
            image_ms=statistics.median(r[0] for r in runs), speedup_vs_stock=1.0, weights_bytes=self.weights_bytes,
            peak_mem_bytes=memory.peak, peak_growth_bytes=memory.growth, **base,
        ))

    def _stock_pipeline(self):
        from diffusers import DiTPipeline, PixArtAlphaPipeline, StableDiffusionPipeline

        s, pipe = self.settings, self.pipe
        scheduler = pipe.make_scheduler(None)
        height, width = self.image
        if pipe.is_unet:
            stock = StableDiffusionPipeline(
                vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.denoiser,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )

            def call(prompt, seed):
                return stock(prompt, num_inference_steps=s.steps, guidance_scale=5.0, height=height, width=width,
                             generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        elif pipe.conditioning == "class":
            if pipe.denoiser.config.num_embeds_ada_norm != 1000:
                raise ValueError("diffusers' DiTPipeline hard-codes the null class 1000 (ImageNet's); this model has "
                                 f"{pipe.denoiser.config.num_embeds_ada_norm} classes")
            stock = DiTPipeline(transformer=pipe.denoiser, vae=pipe.vae, scheduler=scheduler)

            def call(prompt, seed):
                return stock(class_labels=[int(prompt)], num_inference_steps=s.steps, guidance_scale=5.0,
                             generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
        else:
            stock = PixArtAlphaPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                        transformer=pipe.denoiser, scheduler=scheduler)

            def call(prompt, seed):
                return stock(prompt, num_inference_steps=s.steps, guidance_scale=5.0, height=height, width=width,
                             generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                             use_resolution_binning=False, clean_caption=False)
        stock.set_progress_bar_config(disable=True)
        for model in (pipe.denoiser, pipe.text_encoder):
            if model is not None:
                backends.restore_precision(model)
        return stock, call

    def _stock_attention(self):
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        for model in (self.pipe.denoiser, self.pipe.vae):
            for module in model.modules():
                if isinstance(module, Attention):
                    module.set_processor(AttnProcessor2_0())
        if self.pipe.text_encoder is not None:
            self.pipe.text_encoder.set_attn_implementation("sdpa")

    def _studio_attention(self):
        from diffusers.models.attention_processor import Attention

        from studio.integrations import diffusers as studio_diffusers
        from studio.integrations import transformers as studio_transformers

        studio_diffusers.use_studio_attention(self.pipe.denoiser)
        if any(isinstance(m, Attention) for m in self.pipe.vae.modules()):
            studio_diffusers.use_studio_attention(self.pipe.vae)
        if self.pipe.text_encoder is not None:
            studio_transformers.use_studio_attention(self.pipe.text_encoder)


class _Marks:
    """Time stamps recorded from hooks: CUDA events queued on the stream (no sync), or perf_counter."""

    def __init__(self, device: torch.device):
        self.device, self.marks = device, []

    def mark(self, kind: str):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((kind, event))
        else:
            self.marks.append((kind, perf_counter()))

    def clear(self):
        self.marks = []

    def spans(self, start: str, end: str) -> list[float]:
        """Milliseconds from each `start` mark to the next `end` mark."""
        spans, opened = [], None
        for kind, stamp in self.marks:
            if kind == start and opened is None:
                opened = stamp
            elif kind == end and opened is not None:
                if self.device.type == "cuda":
                    stamp.synchronize()
                    spans.append(opened.elapsed_time(stamp))
                else:
                    spans.append((stamp - opened) * 1e3)
                opened = None
        return spans


# ---------------------------------------------------------------------------------------------
# Side by side, and the goals


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
    results.add("side_by_side", _row(
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


# ---------------------------------------------------------------------------------------------
# Writing: JSON, CSV, markdown, PNG


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
            ["model", "path", "attention", "precision", "cache", "fast path", "speculative", "alts", "TTFT ms",
             "prefill tok/s", "prefill TFLOP/s", "decode tok/s", "GB/s", "% BW roofline", "× stock", "accept",
             "KV bytes", "peak mem"],
            [[r["model"], r["path"], r["attention"], r["precision"], r["cache"], r["fast_path"], r["speculative"],
              r["top_logprobs"], _fmt(r["ttft_ms"]), _fmt(r["prefill_tok_s"]), _fmt(r["prefill_tflop_s"] and r["prefill_tflop_s"]),
              _spread(r["decode_tok_s"], r["decode_tok_s_min"], r["decode_tok_s_max"]), _fmt(r["decode_gb_s"]),
              _fmt(r["decode_share_of_roofline"], "pct"), _fmt(r["speedup_vs_stock"], "x"),
              _fmt(r["acceptance_rate"], "pct"), _fmt(r["kv_bytes"], "bytes"), _fmt(r["peak_mem_bytes"], "bytes")]
             for r in llm if r["status"] == "ok"],
        )]
        out.append(_skipped(llm, lambda r: f"{r['model']}: {r['path']} attention={r['attention']} "
                            f"precision={r['precision']} cache={r['cache']} fast path={r['fast_path']} "
                            f"speculative={r['speculative']}"))
    prefill = tables["prefill"]
    if prefill:
        out += ["", "## LLM prefill", "", _table(
            ["model", "attention", "precision", "tokens", "ms", "tok/s", "TFLOP/s", "% matmul peak", "S² scores",
             "peak mem", "growth"],
            [[r["model"], r["attention"], r["precision"], r["tokens"], _spread(r["ms"], r["ms_min"], r["ms_max"]),
              _fmt(r["tok_s"]), _fmt(r["tflop_s"]), _fmt(r["share_of_peak"], "pct"), _fmt(r["scores_bytes"], "bytes"),
              _fmt(r["peak_mem_bytes"], "bytes"), _fmt(r["peak_growth_bytes"], "bytes")]
             for r in prefill if r["status"] == "ok"],
        )]
        out.append(_skipped(prefill, lambda r: f"{r['model']}: attention={r['attention']} precision={r['precision']}"))
    diffusion = tables["diffusion"]
    if diffusion:
        out += ["", "## Diffusion lane", "", _table(
            ["model", "path", "attention", "precision", "CFG", "preview", "image", "ms/step", "it/s", "TFLOP/s",
             "% matmul peak", "VAE decode ms", "ms/image", "× stock", "peak mem", "growth"],
            [[r["model"], r["path"], r["attention"], r["precision"], r["cfg"], r["preview"], r["image"],
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
            [[g["goal"], _goal_fmt(g), {True: "yes", False: "no", None: "–"}[g["met"]] if g["measured"] is None or
              data["meta"]["device"].startswith("cuda") else "– (GPU goal)",
              _fmt(g["distance"], "x") if g["distance"] is not None else "–", g["detail"] or ""] for g in goals],
        )]
    return "\n".join(out).rstrip() + "\n"


def _goal_fmt(goal: dict) -> str:
    value = goal["measured"]
    if value is None:
        return "not measured"
    if goal["unit"] in ("share", "overhead"):
        return _fmt(value, "pct")
    if goal["unit"] == "ratio":
        return _fmt(value, "x")
    return f"{_fmt(value)} {goal['unit']}"


def roofline_axes(ax, title: str) -> None:
    """Log-log axes, labels, legend and grid of a roofline plot (the bench's and the app's)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte of device memory traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)


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
                   label=f"{p['lane']}: {p['workload']} ({p['model']})")
    for r in tables["attention"]:
        if r["status"] == "ok":
            elem = {"fp32": 4, "bf16": 2, "fp16": 2}[r["dtype"]]
            flops = 4 * r["batch"] * r["heads"] * r["head_dim"] * r["seq"] * (r["seq"] + 1) / 2
            nbytes = 4 * r["batch"] * r["heads"] * r["seq"] * r["head_dim"] * elem
            ax.scatter(flops / nbytes, r["tflop_s"], marker="x", s=30, color="grey", zorder=2)
            ax.annotate(r["kernel"], (flops / nbytes, r["tflop_s"]), fontsize=6, color="grey")
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
                   f"{r['precision']} cache {r['cache']} {r['speculative'] if r['speculative'] != 'none' else ''}",
         "decode_tok_s", "decode tokens/s (wall clock; orange: transformers generate)", "LLM lane: decode")
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
