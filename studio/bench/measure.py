"""How `studio bench` measures: device time over rotating inputs, the peak memory of a workload,
the memory a block leaves allocated, and the few statistics every table reports.

The rules (shared/ANCHORS.md):
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

Depends on torch, studio.profiling and the standard library only: it imports no other module of
the bench, no pipeline, no model library and no UI, so every bench module and the tests can use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import statistics
import threading
import time

import torch

from studio.profiling import Measurement, StepTimer

ROTATIONS = 3  # distinct input sets the timed repeats cycle through

# ---------------------------------------------------------------------------------------------
# Time


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


# ---------------------------------------------------------------------------------------------
# Memory


def malloc_trim() -> None:
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
            malloc_trim()
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
        malloc_trim()
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


# ---------------------------------------------------------------------------------------------
# Figures from repeated runs


def median_spread(values):
    """(median, min, max) of the finite values; (None, None, None) when there are none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def paired_overhead(runs: list[dict], off: list[dict], key: str) -> float | None:
    """Median wall time with the feature over the median without it, minus 1 (runs paired in time)."""
    if not off:
        return None
    return statistics.median(r[key] for r in runs) / statistics.median(r[key] for r in off) - 1


def relative_error(predicted, measured) -> float | None:
    """measured / predicted - 1: +0.05 means 5 % more than predicted."""
    if predicted in (None, 0) or measured is None:
        return None
    return measured / predicted - 1
