"""The timing, FLOP-counting and roofline core both lanes measure their steps with."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from studio.profiling import (
    DATASHEET,
    Ceilings,
    StepTimer,
    attention_flops,
    ceilings_for,
    count_flops,
    known_devices,
    match_device_name,
    matmul_flops,
    measure,
    probe_ceilings,
    roofline,
)

torch.set_num_threads(1)  # also set in conftest; repeated so this file runs steady on its own

CPU = torch.device("cpu")
H100 = DATASHEET["H100 SXM"]


# --- timing ----------------------------------------------------------------------------------


def test_timer_measures_real_work():
    timer = StepTimer(CPU)
    a = torch.randn(256, 256)
    with timer.time() as t:
        a @ a
    assert t.ms > 0

    # The minimum of a few runs is robust to a busy machine: load can only make runs slower.
    tiny = torch.randn(4, 4)
    small = measure(torch.mm, tiny, tiny, device=CPU, warmup=1, repeats=5)
    big = measure(torch.mm, a, a, device=CPU, warmup=1, repeats=5)
    assert big.min_ms > 5 * small.min_ms


def test_timing_cannot_be_read_inside_the_region():
    with StepTimer(CPU).time() as t:
        with pytest.raises(RuntimeError, match="has not finished"):
            t.ms
    assert t.ms >= 0


def test_measure_excludes_warmup_and_reports_spread():
    calls = []
    m = measure(calls.append, 1, device="cpu", warmup=2, repeats=4)
    assert len(calls) == 6
    assert len(m.all_ms) == 4
    assert m.min_ms <= m.median_ms <= m.max_ms
    assert m.min_ms == min(m.all_ms) and m.max_ms == max(m.all_ms)


@pytest.mark.gpu
def test_cuda_timer_uses_events_resolved_on_read():
    timer = StepTimer("cuda")
    a = torch.randn(2048, 2048, device="cuda")
    tiny = torch.randn(8, 8, device="cuda")
    with timer.time() as small:
        tiny @ tiny
    with timer.time() as big:
        for _ in range(10):
            a @ a
    assert small._ms is None and big._ms is None  # nothing resolved until read
    assert big.ms > small.ms > 0


# --- FLOPs -----------------------------------------------------------------------------------


def test_flop_counter_on_a_matmul_is_exactly_2mnk():
    m, k, n = 3, 5, 7
    a, b = torch.randn(m, k), torch.randn(k, n)
    result, flops = count_flops(torch.matmul, a, b)
    assert flops == 2 * m * n * k == matmul_flops(m, n, k)
    torch.testing.assert_close(result, a @ b)


def test_flop_counter_on_a_linear_model_is_the_sum_of_its_matmuls():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    _, flops = count_flops(model, torch.randn(4, 16))
    assert flops == matmul_flops(4, 32, 16) + matmul_flops(4, 8, 32)


def test_flop_counter_passes_keyword_arguments():
    q = k = v = torch.randn(1, 2, 3, 4)
    result, _ = count_flops(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    torch.testing.assert_close(result, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("kernel", ["default", "math"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_flops_match_the_flop_counter_on_sdpa(kernel, causal):
    # The default CPU kernel is the fused one FlopCounterMode alone would count as 0; the math
    # kernel decomposes into two bmm's. Both count the full rectangle, causal or not.
    batch, heads, q_len, kv_len, head_dim = 2, 3, 5, 7, 8
    q = torch.randn(batch, heads, q_len, head_dim)
    k, v = torch.randn(batch, heads, kv_len, head_dim), torch.randn(batch, heads, kv_len, head_dim)
    with sdpa_kernel(SDPBackend.MATH) if kernel == "math" else contextlib.nullcontext():
        _, flops = count_flops(F.scaled_dot_product_attention, q, k, v, is_causal=causal)
    assert flops == attention_flops(batch, heads, q_len, kv_len, head_dim)
    assert flops == 4 * batch * heads * q_len * kv_len * head_dim


def test_attention_flops_count_query_heads_with_grouped_keys():
    q = torch.randn(1, 8, 4, 16)
    k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    _, flops = count_flops(F.scaled_dot_product_attention, q, k, v, enable_gqa=True)
    assert flops == attention_flops(1, 8, 4, 6, 16)


# --- ceilings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, row",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ],
)
def test_gpu_names_map_to_their_datasheet_row(name, row):
    assert match_device_name(name) == row


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA H100 NVL",  # lower clocks than the SXM part
        "NVIDIA H100 80GB HBM3 MIG 1g.10gb",  # a slice of the GPU
        "NVIDIA GH200 480GB",
        "NVIDIA H200 NVL",
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "NVIDIA L40S",
        "NVIDIA A100",  # which memory? unknown bandwidth
        "AMD Instinct MI300X",
    ],
)
def test_other_gpu_names_match_no_row(name):
    assert match_device_name(name) is None


def test_datasheet_rows_are_consistent():
    assert known_devices() == list(DATASHEET)
    for name, c in DATASHEET.items():
        assert c.name == name and c.source == "datasheet"
        assert c.bandwidth > 0 and all(v > 0 for v in c.peak_flops.values())
        # Tensor cores: 16-bit matmuls beat plain fp32 on every GPU in the table.
        assert c.peak("fp16") > c.peak("fp32")
    assert "bf16" not in DATASHEET["T4"].peak_flops
    assert DATASHEET["H200"].peak_flops == H100.peak_flops and DATASHEET["H200"].bandwidth > H100.bandwidth


def test_ceilings_for_accepts_a_known_gpu_name():
    assert ceilings_for("H100 SXM") is H100


def test_a_missing_dtype_ceiling_says_what_there_is():
    with pytest.raises(ValueError, match="T4 has no bf16"):
        DATASHEET["T4"].peak(torch.bfloat16)


def test_cpu_probe_returns_positive_finite_ceilings():
    c = probe_ceilings(CPU)
    assert c.source == "measured probe"
    assert set(c.peak_flops) == {"fp32", "bf16"}
    for value in [*c.peak_flops.values(), c.bandwidth]:
        assert math.isfinite(value) and value > 0
    assert probe_ceilings("cpu") is c  # cached
    assert ceilings_for("cpu") is c


# --- roofline --------------------------------------------------------------------------------


def test_decode_is_memory_bound_and_a_big_matmul_compute_bound_on_h100():
    # Decode at batch 1: every bf16 weight (2 bytes) is read once for one multiply-add (2 FLOPs).
    params = 1_000_000_000
    decode = roofline(2 * params, 2 * params, ms=1.0, ceilings=H100, dtype=torch.bfloat16)
    assert decode.intensity == pytest.approx(1.0)
    assert decode.ridge == pytest.approx(989.4e12 / 3.35e12)
    assert decode.bound == "memory"
    assert decode.attainable_flops == pytest.approx(3.35e12)

    n = 8192
    matmul = roofline(matmul_flops(n, n, n), 3 * n * n * 2, ms=2.0, ceilings=H100, dtype="bf16")
    assert matmul.intensity > matmul.ridge
    assert matmul.bound == "compute"
    assert matmul.attainable_flops == 989.4e12


def test_a_step_at_the_predicted_time_reaches_the_whole_ceiling():
    params = 1_000_000_000
    ideal_ms = 2 * params / 3.35e12 * 1e3
    decode = roofline(2 * params, 2 * params, ideal_ms, H100, "bf16")
    assert decode.predicted_ms == pytest.approx(ideal_ms)
    assert decode.share == pytest.approx(1.0)
    assert decode.achieved_bandwidth == pytest.approx(3.35e12)

    half_speed = roofline(2 * params, 2 * params, 2 * ideal_ms, H100, "bf16")
    assert half_speed.share == pytest.approx(0.5)


def test_roofline_edge_cases_do_not_divide_by_zero():
    no_bytes = roofline(1e9, 0, 1.0, H100, "bf16")
    assert no_bytes.intensity == math.inf and no_bytes.bound == "compute"
    assert no_bytes.attainable_flops == H100.peak("bf16")

    copy = roofline(0, 1e9, 1.0, H100, "bf16")
    assert copy.bound == "memory" and copy.share == pytest.approx(1e12 / 3.35e12)

    unmeasured = roofline(1e9, 1e6, 0, H100, "bf16")
    assert math.isnan(unmeasured.share) and math.isnan(unmeasured.achieved_flops)
    assert unmeasured.bound == "compute" and unmeasured.predicted_ms > 0

    with pytest.raises(ValueError):
        roofline(-1, 1, 1, H100, "bf16")


def test_roofline_works_with_probed_ceilings():
    c = Ceilings("toy", {"fp32": 100.0}, 10.0, "measured probe")
    point = roofline(flops=50, bytes=10, ms=10_000.0, ceilings=c, dtype=torch.float32)
    assert point.ridge == 10.0 and point.intensity == 5.0 and point.bound == "memory"
    assert point.attainable_flops == 50.0 and point.share == pytest.approx(0.1)
