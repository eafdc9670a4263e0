"""Timing, FLOP counts and the roofline: how both lanes measure every step they run.

Four parts, in the order a step meets them:
  - `StepTimer` times a region of work: CUDA events on a GPU, so the timed loop never waits for
    the device, and `time.perf_counter` elsewhere; `measure()` repeats a call for benchmarks.
  - `count_flops()` counts what a call computes with torch's own `FlopCounterMode`;
    `matmul_flops()` and `attention_flops()` give the same numbers from shapes alone.
  - `Ceilings` are a device's physical limits: peak matmul FLOP/s per dtype and memory bandwidth,
    from NVIDIA's datasheets for known GPUs or from a quick measured probe for anything else.
  - `roofline()` places a measured step against those ceilings: memory- or compute-bound, and
    what share of the attainable speed it reached.
    `roofline_axes()` labels a matplotlib axes as a roofline plot (the bench's and the app's draw
    on the same axes); it only calls the axes' methods, so matplotlib is not imported here.

Depends on torch and the standard library only; never imports transformers, diffusers, Gradio
or a pipeline, so that both lanes, the inspector and the CLI can share it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import statistics
from dataclasses import dataclass
from time import perf_counter

import torch
from torch.utils.flop_counter import FlopCounterMode

# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _as_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _synchronize(device: torch.device) -> None:
    # torch.cpu, torch.mps, torch.xpu ... each have a synchronize(); on the CPU it is a no-op.
    # Without it an asynchronous device would be timed while it is still queueing work.
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", None)
    if synchronize is not None:
        synchronize()


class StepTiming:
    """The duration of one timed region, in milliseconds, read as `.ms`.

    On a GPU the region is bracketed by two CUDA events queued on the stream. Nothing waits for
    the GPU until `.ms` is first read; that read waits for the end event only (not the whole
    device) and keeps the result. A decode loop can thus time every token and read the times
    when it hands out the token, without a host sync inside the timed region.
    """

    def __init__(self) -> None:
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._ms: float | None = None
        self._done = False

    @property
    def ms(self) -> float:
        if not self._done:
            raise RuntimeError("the timed region has not finished: read .ms after the `with` block")
        if self._ms is None:
            start, end = self._events
            end.synchronize()
            self._ms = start.elapsed_time(end)
        return self._ms


class StepTimer:
    """Times regions of work on one device.

        timer = StepTimer(device)
        with timer.time() as t:
            logits = model(ids)
        t.ms            # device time of the block (resolved when read)
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = _as_device(device)

    @contextlib.contextmanager
    def time(self):
        timing = StepTiming()
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield timing
            end.record(stream)
            timing._events = (start, end)
        else:
            # Synchronizing before the start keeps work queued earlier out of this region.
            _synchronize(self.device)
            started = perf_counter()
            yield timing
            _synchronize(self.device)
            timing._ms = (perf_counter() - started) * 1e3
        timing._done = True


@dataclass(frozen=True)
class Measurement:
    median_ms: float
    min_ms: float
    max_ms: float
    all_ms: tuple[float, ...]  # every timed run, in order; warm-up runs excluded


def measure(fn, *args, device: torch.device | str, warmup: int = 3, repeats: int = 10) -> Measurement:
    """Time `fn(*args)` `repeats` times after `warmup` untimed calls.

    Warm-up absorbs one-off costs (allocator growth, kernel selection, lazy initialisation) that
    are not the speed of the work. On a GPU all runs are queued before any time is read, so the
    runs are back to back, as in a real loop.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    timer = StepTimer(device)
    for _ in range(warmup):
        fn(*args)
    timings = []
    for _ in range(repeats):
        with timer.time() as timing:
            fn(*args)
        timings.append(timing)
    all_ms = tuple(t.ms for t in timings)
    return Measurement(statistics.median(all_ms), min(all_ms), max(all_ms), all_ms)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def matmul_flops(m: int, n: int, k: int) -> int:
    """[m, k] @ [k, n]: m*n outputs, each k multiplies and k adds."""
    return 2 * m * n * k


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """The two matmuls of attention: scores = Q @ K^T, then out = softmax(scores) @ V.

    Counts the full q_len x kv_len rectangle, as `FlopCounterMode` does for every SDPA kernel: a
    causal kernel that skips masked blocks does about half of it when q_len == kv_len. The
    softmax and the scaling are not counted (they are O(q_len * kv_len), not O(... * head_dim)).
    `heads` are the query heads; with grouped-query attention the keys have fewer heads but
    every query head still does its own two matmuls.
    """
    return batch * heads * (matmul_flops(q_len, kv_len, head_dim) + matmul_flops(q_len, head_dim, kv_len))


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, head_dim = query_shape
    kv_len, value_dim = key_shape[-2], value_shape[-1]
    return batch * heads * (matmul_flops(q_len, kv_len, head_dim) + matmul_flops(q_len, value_dim, kv_len))


# FlopCounterMode knows the CUDA SDPA kernels (flash, memory-efficient, cuDNN) but not the fused
# CPU one, which it would count as 0 FLOPs; this formula is the same as its CUDA one.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_flops(fn, *args, **kwargs) -> tuple[object, int]:
    """Run `fn(*args, **kwargs)` and count the FLOPs of its matmuls, convolutions and attention.

    Returns (what fn returned, FLOPs). Counting works at the level of torch operators, so it
    sees exactly the kernels that ran; element-wise work (norms, activations) counts as 0.
    The first call in a process takes a couple of seconds: FlopCounterMode imports torch._dynamo.
    """
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        result = fn(*args, **kwargs)
    return result, counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# Device ceilings
# ---------------------------------------------------------------------------------------------

_DTYPE_KEYS = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float8_e4m3fn: "fp8",
    torch.float8_e5m2: "fp8",
    torch.int8: "int8",
}


def _dtype_key(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPE_KEYS:
        raise ValueError(f"no matmul ceiling for {dtype}; use one of {sorted(set(_DTYPE_KEYS.values()))} or 'tf32'")
    return _DTYPE_KEYS[dtype]


@dataclass(frozen=True)
class Ceilings:
    """What a device can do at most: matmul FLOP/s per dtype and memory bandwidth.

    `peak_flops` keys: "fp32", "tf32", "bf16", "fp16", "fp8", "int8" (those the device has).
    "tf32" is what float32 matmuls reach on tensor cores when torch allows it
    (`torch.set_float32_matmul_precision("high")`); pass "tf32" as the dtype then.
    """

    name: str
    peak_flops: dict[str, float]
    bandwidth: float  # bytes/s of device memory
    source: str  # "datasheet" | "measured probe"

    def peak(self, dtype: torch.dtype | str) -> float:
        key = _dtype_key(dtype)
        if key not in self.peak_flops:
            raise ValueError(f"{self.name} has no {key} matmul ceiling; it has {', '.join(self.peak_flops)}")
        return self.peak_flops[key]


def _datasheet(name, bandwidth, **peak_flops) -> Ceilings:
    return Ceilings(name, peak_flops, bandwidth, "datasheet")


# Dense tensor-core figures: NVIDIA's datasheets quote the low-precision numbers "with sparsity"
# (2:4 structured), which is twice what an ordinary dense matmul can reach, so they are halved.
# Sources: the H100, H200, A100, L4 and T4 datasheets, and the Ada Lovelace architecture
# whitepaper for the RTX 4090 (its FP32-accumulate figures, as torch accumulates 16-bit matmuls
# in fp32; GeForce cards run FP16-accumulate twice as fast). fp32 is the non-tensor-core rate.
_H100_SXM_COMPUTE = dict(fp32=66.9e12, tf32=494.7e12, bf16=989.4e12, fp16=989.4e12, fp8=1978.9e12, int8=1978.9e12)
_A100_COMPUTE = dict(fp32=19.5e12, tf32=156e12, bf16=312e12, fp16=312e12, int8=624e12)

DATASHEET: dict[str, Ceilings] = {
    c.name: c
    for c in [
        _datasheet("H100 SXM", 3.35e12, **_H100_SXM_COMPUTE),
        _datasheet("H100 PCIe", 2.0e12, fp32=51.2e12, tf32=378e12, bf16=756e12, fp16=756e12, fp8=1513e12, int8=1513e12),
        _datasheet("H200", 4.8e12, **_H100_SXM_COMPUTE),  # the H100 SXM's compute with HBM3e
        _datasheet("A100 80GB SXM", 2.039e12, **_A100_COMPUTE),
        _datasheet("A100 80GB PCIe", 1.935e12, **_A100_COMPUTE),
        _datasheet("A100 40GB", 1.555e12, **_A100_COMPUTE),  # SXM and PCIe alike
        _datasheet("L4", 300e9, fp32=30.3e12, tf32=60e12, bf16=121e12, fp16=121e12, fp8=242.5e12, int8=242.5e12),
        _datasheet("T4", 320e9, fp32=8.1e12, fp16=65e12, int8=130e12),  # Turing: no bf16, no tf32
        _datasheet(
            "RTX 4090", 1008e9, fp32=82.6e12, tf32=82.6e12, bf16=165.2e12, fp16=165.2e12, fp8=330.3e12, int8=660.6e12
        ),
    ]
}

# The whole name must match (after dropping the vendor prefix), not just contain "H100": a MIG
# slice ("... MIG 1g.10gb"), an NVL board, a GH200 or a "4090 D" shares the stem but not the
# ceilings, and gets the measured probe instead of a wrong row.
_NAME_PATTERNS = [
    (r"H100 PCIE( \d+GB)?", "H100 PCIe"),
    (r"H100( SXM5?)?( 80GB)?( HBM3)?", "H100 SXM"),
    (r"H200( SXM)?( 141GB)?", "H200"),
    (r"A100 (SXM4? 80GB|80GB SXM4?)", "A100 80GB SXM"),
    (r"A100 (PCIE 80GB|80GB PCIE)", "A100 80GB PCIe"),
    (r"A100 (SXM4? 40GB|PCIE 40GB|40GB( SXM4?| PCIE)?)", "A100 40GB"),
    (r"L4", "L4"),
    (r"T4", "T4"),
    (r"RTX 4090", "RTX 4090"),
]


def match_device_name(name: str) -> str | None:
    """The DATASHEET row for a `torch.cuda.get_device_name()` string, or None if none fits.

    "NVIDIA H100 80GB HBM3" -> "H100 SXM", "NVIDIA A100-SXM4-40GB" -> "A100 40GB", "Tesla T4" -> "T4".
    """
    normal = re.sub(r"[\s_-]+", " ", name.upper()).strip()
    normal = re.sub(r"^(NVIDIA )?(TESLA |GEFORCE )?", "", normal)
    for pattern, row in _NAME_PATTERNS:
        if re.fullmatch(pattern, normal):
            return row
    return None


def known_devices() -> list[str]:
    """The GPUs with datasheet ceilings; each name also works as `ceilings_for(name)`."""
    return list(DATASHEET)


def ceilings_for(device: torch.device | str) -> Ceilings:
    """The ceilings of a device (or of a known GPU by its DATASHEET name, e.g. "H100 SXM").

    A recognised GPU gets its datasheet figures; anything else, the CPU included, gets a
    measured probe (cached, see `probe_ceilings`).
    """
    if isinstance(device, str) and device in DATASHEET:
        return DATASHEET[device]
    device = _as_device(device)
    if device.type == "cuda":
        row = match_device_name(torch.cuda.get_device_name(device))
        if row is not None:
            return DATASHEET[row]
    return probe_ceilings(device)


# Probe sizes. Matrices grow until one multiply takes _PROBE_MATMUL_MS, long enough to hide
# timer and launch overhead (bf16 on a CPU without bf16 units stops at a small size, fp32 on a GPU
# at the cap). The copy must outgrow the last-level cache so that it measures memory: 64 MiB is
# several times a usual CPU L3 and still quick to allocate; 1 GiB is 20x an H100's 50 MB L2.
_PROBE_MATMUL_MS = 5.0
_PROBE_MAX_N = 8192
_PROBE_COPY_BYTES = {"cpu": 64 * 2**20}
_PROBE_COPY_BYTES_ACCELERATOR = 2**30


def _probe_dtypes(device: torch.device) -> list[torch.dtype]:
    if device.type == "cpu":
        return [torch.float32, torch.bfloat16]  # fp16 matmuls on CPUs are rarely a real path
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def _probe_matmul(device: torch.device, dtype: torch.dtype) -> float:
    n = 128
    while True:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        # the fastest of ten: a ceiling is what the device can do, and on a shared machine most
        # runs are slowed by someone else (three were not enough to find one that was not)
        ms = measure(torch.mm, a, b, device=device, warmup=2, repeats=10).min_ms
        if ms >= _PROBE_MATMUL_MS or n >= _PROBE_MAX_N:
            return matmul_flops(n, n, n) / (ms / 1e3)
        n *= 2


def _probe_bandwidth(device: torch.device) -> float:
    size = _PROBE_COPY_BYTES.get(device.type, _PROBE_COPY_BYTES_ACCELERATOR)
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = measure(target.copy_, source, device=device, warmup=2, repeats=10).min_ms
    return 2 * size / (ms / 1e3)  # every byte is read once and written once


def probe_ceilings(device: torch.device | str) -> Ceilings:
    """Measure a device's ceilings: matmul FLOP/s per float dtype it runs, copy bandwidth.

    Each figure is the fastest of a few runs, as a ceiling is the best the device does, not its
    typical speed. Takes well under a second on a 2-core CPU; cached per device (and, for a CPU,
    per torch thread count, which changes both figures).
    """
    device = _as_device(device)
    return _probe(str(device), torch.get_num_threads() if device.type == "cpu" else 0)


@functools.cache
def _probe(device_name: str, cpu_threads: int) -> Ceilings:
    device = torch.device(device_name)
    peak_flops = {_dtype_key(dtype): _probe_matmul(device, dtype) for dtype in _probe_dtypes(device)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        name = f"cpu ({cpu_threads} thread{'s' if cpu_threads > 1 else ''})"
    else:
        name = device_name
    return Ceilings(name, peak_flops, _probe_bandwidth(device), "measured probe")


# ---------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RooflinePoint:
    flops: float
    bytes: float
    ms: float
    dtype: str
    intensity: float  # FLOPs per byte moved
    ridge: float  # the intensity where the device stops being memory-bound: peak / bandwidth
    bound: str  # "memory" | "compute"
    attainable_flops: float  # the roof at this intensity: min(peak, intensity * bandwidth)
    predicted_ms: float  # the time the roof allows: max(flops / peak, bytes / bandwidth)
    achieved_flops: float  # FLOP/s
    achieved_bandwidth: float  # bytes/s
    share: float  # achieved / attainable: 1.0 is on the roof


def roofline(flops: float, bytes: float, ms: float, ceilings: Ceilings, dtype: torch.dtype | str) -> RooflinePoint:
    """Place a step that did `flops` FLOPs and moved `bytes` bytes in `ms` on the roofline.

    A step is memory-bound when its arithmetic intensity (FLOPs per byte) is below the ridge
    point: the memory cannot feed the compute units fast enough. Decode (a matrix-vector product
    per weight, ~1 FLOP per byte in bf16) sits far left of the ridge; prefill and denoising
    (matrix-matrix, hundreds of FLOPs per byte) sit right of it.

    `share` is achieved / attainable. For a memory-bound step this equals achieved bandwidth /
    peak bandwidth, which is how it is computed, so a step with no FLOPs (a copy) gets a share too.

    Edge cases, none of which raises:
      - bytes == 0: no memory traffic to wait for, so the intensity is infinite and the step is
        compute-bound against the peak.
      - ms == 0: nothing was measured (e.g. a prediction before running); the achieved rates and
        the share are NaN, while intensity, bound and predicted_ms still place the work.
    Negative inputs raise ValueError.
    """
    if flops < 0 or bytes < 0 or ms < 0:
        raise ValueError(f"flops, bytes and ms must be >= 0, got {flops}, {bytes}, {ms}")
    key = _dtype_key(dtype)
    peak, bandwidth = ceilings.peak(key), ceilings.bandwidth
    intensity = flops / bytes if bytes > 0 else math.inf
    ridge = peak / bandwidth
    bound = "memory" if intensity < ridge else "compute"
    attainable = min(peak, intensity * bandwidth)
    predicted_ms = max(flops / peak, bytes / bandwidth) * 1e3
    if ms > 0:
        achieved_flops, achieved_bandwidth = flops / (ms / 1e3), bytes / (ms / 1e3)
        share = achieved_bandwidth / bandwidth if bound == "memory" else achieved_flops / peak
    else:
        achieved_flops = achieved_bandwidth = share = math.nan
    return RooflinePoint(
        flops=flops,
        bytes=bytes,
        ms=ms,
        dtype=key,
        intensity=intensity,
        ridge=ridge,
        bound=bound,
        attainable_flops=attainable,
        predicted_ms=predicted_ms,
        achieved_flops=achieved_flops,
        achieved_bandwidth=achieved_bandwidth,
        share=share,
    )


def roofline_axes(ax, title: str) -> None:
    """Log-log axes, labels, legend and grid of a roofline plot (the bench's and the app's)."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs per byte of device memory traffic)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
