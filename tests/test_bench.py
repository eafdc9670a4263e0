"""`studio bench`: a smoke run on tiny random models, and the memory measurements it relies on. No timings are asserted."""

import csv
import json

import pytest
import torch

from studio import bench
from studio.cli import main
from studio.profiling import ceilings_for


def test_peak_memory_sees_an_allocation_and_resets_per_workload():
    device = torch.device("cpu")
    with bench.PeakMemory(device) as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    with bench.PeakMemory(device) as small:
        torch.ones(1024)
    assert big.growth >= 60 * 2**20
    assert small.growth < 16 * 2**20  # the peak of the workload before does not carry over


def test_eager_attention_peak_memory_shows_the_score_matrix_the_others_never_build():
    settings = bench.Settings.for_device("cpu", quick=True)
    results = bench.Results(settings)
    results.ceilings = ceilings_for("cpu")
    attention = bench.AttentionBench(settings, results)
    rows = {name: attention.run(name, seq=1024, repeats=1, warmup=0) for name in ("eager", "tiled", "sdpa")}
    assert all(row["status"] == "ok" for row in rows.values())
    scores = rows["eager"]["scores_bytes"]
    assert scores == 16 * 1024 * 1024 * 4  # batch 1 x 16 heads x S² fp32
    assert rows["eager"]["peak_growth_bytes"] >= scores
    for name in ("tiled", "sdpa"):
        assert rows[name]["peak_growth_bytes"] < scores / 4
        assert not rows[name]["materialises_scores"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", "--quick", "--shape", "tiny-llama", "--shape", "tiny-sd", "--out", str(out), "--threads", "1",
                 "--repeats", "2", "--steps", "2", "--new-tokens", "8", "--prefill-tokens", "64",
                 "--attention-seq", "256", "--attention", "eager,sdpa", "--no-progress"])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


def test_quick_bench_writes_json_csv_markdown_and_plots(quick_run):
    out, data = quick_run
    for table, columns in bench.COLUMNS.items():
        with open(out / f"{table}.csv") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == columns
            assert len(list(reader)) == len(data["tables"][table]) > 0
    for plot in ("roofline", "llm", "diffusion", "attention"):
        assert (out / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "bench.md").read_text()
    for section in ("## LLM lane", "## LLM prefill", "## Diffusion lane", "## Attention kernels",
                    "## Side by side", "## Predicted", "## Goals"):
        assert section in md
    assert data["meta"]["memory_method"] and data["ceilings"]["bandwidth"] > 0


def test_quick_bench_places_both_lanes_next_to_the_stock_libraries(quick_run):
    _, data = quick_run
    llm, diffusion = data["tables"]["llm"], data["tables"]["diffusion"]
    stock = [r for r in llm if r["path"] == "transformers generate()"]
    assert stock and stock[0]["status"] == "ok" and stock[0]["decode_tok_s"] > 0
    default = next(r for r in llm if r["path"] == "studio" and r["attention"] == "auto" and r["cache"] == "on"
                   and r["speculative"] == "none" and r["precision"] == "native" and not r["top_logprobs"])
    for column in ("ttft_ms", "prefill_tok_s", "prefill_tflop_s", "decode_tok_s", "decode_gb_s",
                   "decode_share_of_roofline", "speedup_vs_stock", "peak_mem_bytes"):
        assert default[column] is not None and default[column] > 0, column
    assert {r["cache"] for r in llm if r["status"] == "ok"} == {"on", "off"}
    assert {r["speculative"] for r in llm if r["status"] == "ok"} >= {"none", "prompt-lookup", "self"}
    fast = [r for r in llm if r["fast_path"] == "on"]
    assert fast and all(r["status"] == "skipped" and r["reason"] for r in fast)  # listed, not faked

    assert any(r["path"] == "stock diffusers" and r["status"] == "ok" for r in diffusion)
    cfg = {r["cfg"] for r in diffusion if r["path"] == "studio" and r["status"] == "ok"}
    assert cfg == {"batched", "sequential", "off"}
    ours = next(r for r in diffusion if r["path"] == "studio" and r["status"] == "ok")
    for column in ("step_ms", "it_s", "tflop_s", "share_of_peak", "vae_decode_ms", "speedup_vs_stock"):
        assert ours[column] is not None and ours[column] > 0, column

    workloads = {(r["lane"], r["workload"]) for r in data["tables"]["side_by_side"]}
    assert workloads == {("llm", "prefill"), ("llm", "decode"), ("diffusion", "denoise step"), ("diffusion", "vae decode")}
    assert {g["id"] for g in data["goals"]} == {g["id"] for g in bench.GOALS}


def test_quick_bench_checks_the_inspector_against_what_it_measured(quick_run):
    _, data = quick_run
    rows = {(r["model"], r["quantity"]): r for r in data["tables"]["inspector"]}
    llm, sd = "tiny-llama (random weights)", "tiny-sd (random weights)"
    assert rows[(llm, "parameters")]["error"] == 0
    assert rows[(llm, "KV cache per token")]["error"] == 0
    assert rows[(sd, "denoiser parameters")]["error"] == 0
    assert abs(rows[(sd, "denoise step FLOPs")]["error"]) < 1e-3


def test_inspect_shows_a_measured_benchmark_next_to_the_prediction(quick_run, capsys):
    out, _ = quick_run
    assert main(["inspect", "tiny-llama", "--results", str(out / "bench.json")]) == 0
    text = capsys.readouterr().out
    assert "measured" in text and "KV cache per token" in text and "error" in text
