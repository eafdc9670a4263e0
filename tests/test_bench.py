"""`studio bench`: a smoke run on tiny random models, and the memory measurements it relies on. No timings are asserted."""

import csv
import json
import sys

import pytest
import torch

from studio import bench
from studio.bench.results import precision_grid, table_row
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
    for section in ("## LLM lane", "## LLM prefill", "## Precision agreement", "## Diffusion lane",
                    "## Attention kernels", "## Side by side", "## Predicted", "## Goals"):
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
    assert {r["fast_path"] for r in llm if r["path"] == "studio"} == {"on", "off"}  # every row says which
    _fast_path_rows_ran(data)
    llamacpp = [r for r in llm if r["path"] == "llama.cpp"]
    assert len(llamacpp) == 1 and llamacpp[0]["status"] == "skipped" and "GGUF" in llamacpp[0]["reason"]

    assert any(r["path"] == "stock diffusers" and r["status"] == "ok" for r in diffusion)
    cfg = {r["cfg"] for r in diffusion if r["path"] == "studio" and r["status"] == "ok"}
    assert cfg == {"batched", "sequential", "off"}
    ours = next(r for r in diffusion if r["path"] == "studio" and r["status"] == "ok")
    for column in ("step_ms", "it_s", "tflop_s", "share_of_peak", "vae_decode_ms", "speedup_vs_stock"):
        assert ours[column] is not None and ours[column] > 0, column

    workloads = {(r["lane"], r["workload"]) for r in data["tables"]["side_by_side"]}
    assert workloads == {("llm", "prefill"), ("llm", "decode"), ("diffusion", "denoise step"), ("diffusion", "vae decode")}
    assert {g["id"] for g in data["goals"]} == {g["id"] for g in bench.GOALS}


def _fast_path_rows_ran(data):
    """The fast path's rows run wherever the fast path does, the CPU included (compiled, with its
    compile time apart), and say why where they do not."""
    device = data["meta"]["device"]
    fast = [r for r in data["tables"]["llm"] if r["fast_path"] == "on"]
    ran = [r for r in fast if r["status"] == "ok"]
    assert fast and all(r["reason"] for r in fast if r["status"] != "ok")  # listed, not faked
    if device == "cpu" or device.startswith("cuda"):
        own = "bf16" if device.startswith("cuda") else data["meta"]["cpu_fast_path_weights"]["format"]
        assert {(r["weights"], r["top_logprobs"]) for r in ran} == {(own, 0), (own, 5), ("int8", 0)}
        assert all(r["compile_s"] is not None and r["decode_tok_s"] > 0 for r in ran)
        assert ran[0]["compile_s"] > 0  # the first one compiled; the top-5 row reuses its compiled step
        paired = next(r for r in ran if r["top_logprobs"] == 5)
        assert paired["paired_overhead"] is not None


def test_quick_bench_measures_time_to_first_token_and_precision_agreement(quick_run):
    _, data = quick_run
    prefill = {r["path"]: r for r in data["tables"]["prefill"] if r["model"].startswith("tiny-llama")}
    stock, plain = prefill["transformers generate()"], prefill["studio stream (plain loop)"]
    assert stock["status"] == plain["status"] == "ok"
    assert plain["ttft_ms"] >= plain["ms"] > 0 and plain["speedup_vs_stock"] > 0  # event inside the wall clock
    assert prefill["llama.cpp"]["status"] == "skipped"  # random weights: no GGUF
    forward = [r for r in data["tables"]["prefill"] if r["path"] == "studio (prefill forward)"]
    assert any(r["status"] == "ok" for r in forward)
    agreement = {r["precision"]: r for r in data["tables"]["agreement"]}
    assert set(agreement) == {"bf16", "int8", "fp16"}
    int8 = agreement["int8"]
    assert int8["status"] == "ok" and int8["positions"] == 32  # --quick: 32 greedy positions
    assert 0 <= int8["top1_agreement"] <= 1 and int8["max_logit_difference"] >= 0
    md = (quick_run[0] / "bench.md").read_text()
    assert "## Precision agreement" in md and "compile s" in md


def test_cpu_goals_are_ratios_of_rows_measured_in_one_run():
    """The CPU goals (issue 13) read as the same-run ratios they state, met or not on a CPU run."""
    settings = bench.Settings.for_device("cpu", quick=True)
    settings.prefill_tokens = 512
    results = bench.Results(settings)
    results.ceilings = ceilings_for("cpu")
    results.meta["cpu_fast_path_weights"] = {"format": "bf16", "reason": "test"}

    def llm_row(path, tok_s, fast="off", weights="fp32", top=0):
        results.add("llm", table_row("llm", model="m", path=path, cache="on", speculative="none", status="ok",
                                     fast_path=fast, weights=weights, top_logprobs=top, decode_tok_s=tok_s))

    llm_row("transformers generate()", 20.0)
    llm_row("llama.cpp", 100.0, weights="Q4_1")
    llm_row("studio", 22.0)  # the plain loop, fp32
    llm_row("studio", 21.0, top=5)
    llm_row("studio", 60.0, fast="on", weights="bf16")
    llm_row("studio", 55.0, fast="on", weights="bf16", top=5)
    llm_row("studio", 40.0, fast="on")  # fast path, fp32
    llm_row("studio", 70.0, fast="on", weights="int8")
    for precision, share in (("bf16", 0.99), ("int8", 0.97)):
        results.add("agreement", table_row("agreement", model="m", precision=precision, status="ok", positions=256,
                                           top1_agreement=share, max_logit_difference=0.5))
    for path, ms, ttft in (("transformers generate()", 900.0, 900.0), ("studio stream (fast path)", 400.0, 450.0)):
        results.add("prefill", table_row("prefill", model="m", path=path, status="ok", ms=ms, ttft_ms=ttft,
                                         weights="bf16"))
    bench.evaluate_goals(results)
    goals = {g["id"]: g for g in results.goals}
    assert goals["cpu-vs-llamacpp"]["measured"] == pytest.approx(0.55) and goals["cpu-vs-llamacpp"]["met"] is False
    assert goals["cpu-vs-generate"]["measured"] == pytest.approx(55 / 20) and goals["cpu-vs-generate"]["met"] is True
    assert goals["cpu-int8"]["measured"] == pytest.approx(70 / 40) and goals["cpu-int8"]["met"] is True
    assert goals["cpu-bf16"]["measured"] == pytest.approx(60 / 40) and goals["cpu-bf16"]["met"] is True
    assert goals["cpu-agreement"]["measured"] == pytest.approx(0.97) and goals["cpu-agreement"]["met"] is True
    assert goals["cpu-prefill"]["measured"] == pytest.approx(2.0) and goals["cpu-prefill"]["met"] is True
    assert goals["cpu-diffusion"]["measured"] is None and "not measured" in goals["cpu-diffusion"]["detail"]
    assert goals["smollm-decode"]["met"] is None  # a GPU goal on a CPU run: distance only

    again = bench.Results.from_json(json.loads(json.dumps(results.to_json())))  # as scripts/gpu-check reads it
    bench.evaluate_goals(again)
    assert [g["measured"] for g in again.goals] == [g["measured"] for g in results.goals]

    results.goals.clear()
    results.meta["cpu_fast_path_weights"] = {"format": "fp32", "reason": "this CPU has no bf16 matmul instructions"}
    bench.evaluate_goals(results)
    bf16 = next(g for g in results.goals if g["id"] == "cpu-bf16")
    assert bf16["measured"] is None and "no bf16 matmul" in bf16["detail"]


def test_the_markdown_tells_adapter_and_compiled_rows_from_the_plain_ones():
    settings = bench.Settings.for_device("cpu")
    results = bench.Results(settings)
    results.ceilings = ceilings_for("cpu")
    for adapter in ("none", "unmerged"):
        results.add("llm", table_row("llm", model="m", path="studio", cache="on", speculative="none", status="ok",
                                     fast_path="off", adapter=adapter, decode_tok_s=20.0))
    for adapter, fast in (("none", "off"), ("merged", "off"), ("none", "compiled")):
        results.add("diffusion", table_row("diffusion", model="d", path="studio", status="ok", cfg="batched",
                                           adapter=adapter, fast_path=fast, step_ms=5.0))
    text = bench.markdown(results.to_json())
    llm_table = text.split("## LLM lane")[1].split("\n\n")[1].splitlines()
    assert "| LoRA |" in llm_table[0]
    assert [row.split(" | ")[5] for row in llm_table[2:]] == ["none", "unmerged"]
    diffusion_table = text.split("## Diffusion lane")[1].split("\n\n")[1].splitlines()
    assert "| LoRA | fast path |" in diffusion_table[0]
    assert [row.split(" | ")[4:6] for row in diffusion_table[2:]] == [["none", "off"], ["merged", "off"],
                                                                    ["none", "compiled"]]


def test_settings_narrow_the_precisions_and_bound_the_cacheless_row():
    settings = bench.Settings.for_device("cpu", new_tokens=128, precisions=("int8",))
    grid = dict(precision_grid(settings, torch.device("cpu"), torch.float32))
    assert grid["int8"] is None and "not asked for" in grid["bf16"]
    llm = bench.LLMBench(settings, bench.Results(settings), "tiny-llama", shape=True)
    cacheless = [v for v in llm.variants() if not v["cache"]]
    assert [v["new_tokens"] for v in cacheless] == [32]  # quadratic without a cache: bounded on the CPU
    quick = bench.Settings.for_device("cpu", quick=True)
    assert [v["new_tokens"] for v in bench.LLMBench(quick, bench.Results(quick), "tiny-llama", True).variants()
            if not v["cache"]] == [quick.new_tokens]


def test_llamacpp_row_is_skipped_with_the_reason_where_its_binding_is_missing(monkeypatch):
    from studio.bench import llamacpp

    monkeypatch.setitem(sys.modules, "cyllama", None)  # import cyllama now raises ImportError
    monkeypatch.setitem(sys.modules, "cyllama.llama", None)
    monkeypatch.setitem(sys.modules, "cyllama.llama.llama_cpp", None)
    assert "pip install '.[llamacpp]'" in llamacpp.unavailable()
    assert llamacpp.gguf_path("tiny-llama")[0] is None and "GGUF" in llamacpp.gguf_path("tiny-llama")[1]


def test_llamacpp_decodes_the_shipped_gguf_with_the_studios_threads():
    pytest.importorskip("cyllama.llama.llama_cpp", reason="the optional extra llamacpp (cyllama) is not installed")
    from studio.bench import llamacpp

    path, reason = llamacpp.gguf_path("smollm2-135m")
    if path is None:
        pytest.skip(reason)
    runner = llamacpp.LlamaCpp(path, context=64, threads=torch.get_num_threads())
    try:
        first = runner.generate("The cat sat", new_tokens=4)
        again = runner.generate("The cat sat", new_tokens=4)  # the cache is cleared between runs
        assert runner.quantization == "Q4_1" and runner.weights_bytes > 0
        assert runner.ctx.n_threads() == runner.ctx.n_threads_batch() == torch.get_num_threads()
        assert len(first["token_ids"]) == 4 and first["token_ids"] == again["token_ids"]  # greedy
        assert first["ttft_ms"] > 0 and first["decode_tok_s"] > 0 and first["prompt_len"] == len(runner.tokens("The cat sat"))
        with pytest.raises(ValueError, match="context"):
            runner.generate("The cat sat", new_tokens=64)
    finally:
        runner.close()


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
