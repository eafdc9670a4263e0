"""The fast paths of both lanes, against the plain loops they replace.

On the CPU the LLM fast path runs eagerly in most tests here (static cache, fused weights,
in-step sampling: all but the compile and the graph), in the model's own dtype so that its tokens
must be the plain loop's exactly; one slow test compiles it. The CUDA-graph tests run where a GPU
is present and are skipped cleanly elsewhere.
"""

import threading
import time

import numpy as np
import pytest
import torch
from tiny_models import SIZE, generate_image, studio_pipeline, tiny_dit_components, tiny_llm, tiny_sd_components
from transformers import DynamicCache

from pipelines.fast_decode import CapturedStep, FastDecoder, StepSampler, cpu_weight_format
from pipelines.fast_llama import MIN_CACHE_LENGTH, cache_length
from pipelines.generation import cache_keyword
from pipelines.fast_diffusion import enable_fast_path, warm_up
from pipelines.sampling import SamplingSettings
from pipelines.text_generation import TextGenerationPipeline
from studio import backends
from studio.bench.agreement import agreement
from studio.backends.precision import PrecisionLinear
from studio.integrations.diffusers import StudioAttnProcessor

PROMPT = "The cat sat on the mat. The cat sat"
PROMPTS = [PROMPT, "A dog", "Once upon a time there"]
cuda = pytest.mark.gpu


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llm(request, tokenizer):
    pipeline = TextGenerationPipeline(tiny_llm(request.param), tokenizer)
    # the model's own dtype, not the CPU's fastest format: the plain loop's tokens exactly
    pipeline.fast_decoder = FastDecoder(pipeline.model, weights=None)
    return pipeline


def assert_same_events(plain, fast):
    """Same tokens, same alternatives in the same order, the same probabilities within rounding."""
    assert fast.token_ids == plain.token_ids
    assert fast.finish_reason == plain.finish_reason
    assert [e.phase for e in fast.steps] == [e.phase for e in plain.steps]
    for a, b in zip(plain.steps[1:], fast.steps[1:]):
        assert (b.index, b.text, b.shapes, b.flops, b.bytes) == (a.index, a.text, a.shapes, a.flops, a.bytes)
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        for top_a, top_b in ((a.top, b.top), (a.top_processed, b.top_processed)):
            assert [(text, i) for text, i, _ in top_b] == [(text, i) for text, i, _ in top_a]
            assert [p for *_, p in top_b] == pytest.approx([p for *_, p in top_a], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The LLM lane: the same events as the plain loop


def test_greedy_matches_the_plain_loop(llm):
    assert_same_events(llm(PROMPT, max_new_tokens=16, fast_path=False), llm(PROMPT, max_new_tokens=16, fast_path=True))


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=1.0, top_k=50, top_p=0.95, seed=3),
        dict(temperature=0.7, min_p=0.1, repetition_penalty=1.2, seed=5),
        dict(repetition_penalty=1.3),  # greedy with a penalty
    ],
    ids=["top-k-top-p", "min-p-penalty", "greedy-penalty"],
)
def test_sampling_inside_the_step_draws_the_plain_loops_tokens(llm, settings):
    plain = llm(PROMPT, max_new_tokens=16, fast_path=False, **settings)
    assert_same_events(plain, llm(PROMPT, max_new_tokens=16, fast_path=True, **settings))


def test_padded_batch_matches_the_plain_loop(llm):
    plain = llm(PROMPTS, max_new_tokens=10, fast_path=False)
    for plain_output, fast_output in zip(plain, llm(PROMPTS, max_new_tokens=10, fast_path=True)):
        assert_same_events(plain_output, fast_output)


def test_precision_follows_the_pipeline(llm):
    with backends.use(precision="int8"):
        plain = llm(PROMPT, max_new_tokens=8, fast_path=False)
        fast = llm(PROMPT, max_new_tokens=8, fast_path=True)
    assert llm.fast_decoder.precision == "int8"
    assert any(isinstance(m, PrecisionLinear) for m in llm.fast_decoder.model.modules())
    assert_same_events(plain, fast)
    llm(PROMPT, max_new_tokens=2, fast_path=True)  # back to the model's own precision
    assert llm.fast_decoder.precision is None


def test_events_report_the_static_cache(llm):
    out = llm(PROMPT, max_new_tokens=4, fast_path=True)
    cache = llm.fast_decoder.last_session.cache
    assert cache.max_len == MIN_CACHE_LENGTH
    assert all(e.kv_cache_bytes == cache.nbytes for e in out.steps[1:])
    assert out.steps[1].shapes["token_ids"] == (1, len(out.steps[0].token_ids))
    assert out.steps[2].shapes["token_ids"] == (1, 1)


def test_stops_at_a_stop_string_and_the_session_is_reused(llm):
    plain = llm(PROMPT, max_new_tokens=20, stop=" ", fast_path=False)
    fast = llm(PROMPT, max_new_tokens=20, stop=" ", fast_path=True)
    session = llm.fast_decoder.last_session
    assert_same_events(plain, fast)
    llm(PROMPT, max_new_tokens=20, stop=" ", fast_path=True)
    assert llm.fast_decoder.last_session is session  # same shapes and settings: cache (and graph) kept
    llm(PROMPTS, max_new_tokens=4, fast_path=True)
    assert llm.fast_decoder.last_session is not session  # a new batch size: a new session


def test_a_closed_stream_frees_the_session(llm):
    stream = llm.stream(PROMPT, max_new_tokens=10, fast_path=True)
    for _ in range(3):
        next(stream)
    stream.close()
    assert not llm.fast_decoder._busy
    assert_same_events(llm(PROMPT, max_new_tokens=10, fast_path=False), llm(PROMPT, max_new_tokens=10, fast_path=True))


def test_a_concurrent_stream_gets_its_own_session(llm):
    expected = llm(PROMPT, max_new_tokens=6, fast_path=False).token_ids
    first = llm.stream(PROMPT, max_new_tokens=6, fast_path=True)
    next(first), next(first)  # tokenize, prefill: the kept session is now in use
    assert llm(PROMPT, max_new_tokens=6, fast_path=True).token_ids == expected
    assert [e.token_id for e in first] == expected[1:]


def test_stop_event_ends_generation(llm):
    stop = threading.Event()
    events = []
    for event in llm.stream(PROMPT, max_new_tokens=20, fast_path=True, stop_event=stop):
        events.append(event)
        if event.phase == "decode" and event.index == 2:
            stop.set()
    assert events[-1].index == 2 and not llm.fast_decoder._busy


# ---------------------------------------------------------------------------------------------
# The static cache and the decode step


def test_static_cache_is_written_at_input_pos_and_matches_transformers(tokenizer):
    model = tiny_llm("llama")
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    decoder = FastDecoder(model, weights=None)
    steps = 5
    with decoder.session(1, 64, StepSampler(SamplingSettings(), top_n=3)) as session, torch.no_grad():
        out = session.prefill(ids, torch.ones_like(ids), generator=None)
        tokens = [int(out.next_token)]
        assert session.cache.filled == int(session.input_pos) == ids.shape[1]
        for _ in range(steps):
            out = session.decode(generator=None)
            tokens.append(int(out.next_token))
            assert session.cache.filled == int(session.input_pos)
            assert int(session.token) == tokens[-1]  # the step feeds its own token to the next replay
        cache = session.cache
    filled = ids.shape[1] + steps
    assert cache.filled == filled
    assert cache.valid[0].tolist() == [True] * filled + [False] * (64 - filled)
    # the same sequence through transformers: its dynamic cache holds the same K and V
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.cat([ids, torch.tensor([tokens[:-1]])], dim=1), **{cache_keyword(model): reference}, use_cache=True)
    for layer, expected in enumerate(reference.layers):
        torch.testing.assert_close(cache.keys[layer][:, :, :filled], expected.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cache.values[layer][:, :, :filled], expected.values, atol=1e-5, rtol=1e-4)
        assert not cache.keys[layer][:, :, filled:].any()  # nothing written past input_pos
    assert out.top_raw_ids.shape == out.top_processed_ids.shape == (1, 3) and out.logprob.shape == (1,)


def test_cache_length_is_a_power_of_two_within_the_context():
    assert cache_length(10, None) == MIN_CACHE_LENGTH
    assert cache_length(MIN_CACHE_LENGTH + 1, None) == 2 * MIN_CACHE_LENGTH
    assert cache_length(1000, 2048) == 1024
    assert cache_length(3000, 4096) == 4096
    assert cache_length(100, 128) == 128  # never past the model's context


def test_weights_are_shared_and_fused(tokenizer):
    model = tiny_llm("qwen2")  # Qwen2: biases on q, k and v, fused with them
    decoder = FastDecoder(model, weights=None)
    block, layer = decoder.model.layers[0], model.model.layers[0]
    assert block.wo.weight is layer.self_attn.o_proj.weight and block.w2.weight is layer.mlp.down_proj.weight
    assert decoder.model.lm_head.weight is model.lm_head.weight
    attn = layer.self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    torch.testing.assert_close(block.wqkv.weight, fused)
    torch.testing.assert_close(block.wqkv.bias, torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    assert block.w13.weight.shape == (2 * model.config.intermediate_size, model.config.hidden_size)


# ---------------------------------------------------------------------------------------------
# Choosing the path


def test_on_the_cpu_the_default_is_the_fast_path_in_the_cpus_fastest_format(tokenizer):
    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    out = llm(PROMPT, max_new_tokens=12)
    decoder = llm.fast_decoder
    assert decoder is not None and decoder.last_session is not None
    assert decoder.weights == cpu_weight_format(torch.device("cpu"))[0]
    assert decoder.weights_reason in decoder.status()
    # bf16 weights may part from the plain loop where two tokens are nearly tied: the precision's
    # teacher-forced agreement is what the fast path promises, measured as the bench measures it
    if decoder.weights is not None:
        assert agreement(llm, PROMPT, new_tokens=32, precision=decoder.weights)["top1_agreement"] >= 0.9
    else:
        assert out.token_ids == llm(PROMPT, max_new_tokens=12, fast_path=False).token_ids


@pytest.mark.parametrize("bf16, expected", [(True, "bf16"), (False, None)])
def test_a_cpu_without_fast_bf16_keeps_fp32_weights_and_says_why(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    weights, reason = cpu_weight_format(torch.device("cpu"))
    assert weights == expected
    assert ("no bf16 matmul instructions" in reason) == (not bf16)
    decoder = FastDecoder(tiny_llm("llama"))
    assert decoder.weights == expected and reason in decoder.status()


def test_a_failing_fast_path_falls_back_to_the_plain_loop_once_and_for_all(tokenizer, monkeypatch):
    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    expected = llm(PROMPT, max_new_tokens=6, fast_path=False)
    calls = []

    def broken_prefill(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr("pipelines.fast_decode.DecodeSession.prefill", broken_prefill)
    out = llm(PROMPT, max_new_tokens=6)
    assert out.token_ids == expected.token_ids
    assert "the fast path failed on cpu (no kernel image" in out.steps[1].notice
    assert [e.notice for e in out.steps[2:]] == [None] * 5  # said once
    again = llm(PROMPT, max_new_tokens=6)
    assert again.token_ids == expected.token_ids and len(calls) == 1  # not tried again
    assert all(e.notice is None for e in again.steps)
    with pytest.raises(ValueError, match="fast_path=True, but the fast path failed on cpu"):
        llm(PROMPT, max_new_tokens=2, fast_path=True)


def test_a_failed_compile_leaves_the_step_eager_and_is_told_once(llm):
    llm.fast_decoder = FastDecoder(llm.model, weights=None, compile=True)

    def failing_compiler(*args):
        raise RuntimeError("C++ compile error: g++ not found")

    llm.fast_decoder.compiled_forward = failing_compiler
    plain = llm(PROMPT, max_new_tokens=8, fast_path=False)
    fast = llm(PROMPT, max_new_tokens=8, fast_path=True)
    assert_same_events(plain, fast)
    assert "compiling the decode step failed (C++ compile error" in fast.steps[1].notice
    assert llm(PROMPT, max_new_tokens=4, fast_path=True).steps[1].notice is None
    assert "runs uncompiled" in llm.fast_decoder.status()
    llm.fast_decoder = FastDecoder(llm.model, weights=None)


def test_background_compile_runs_eagerly_until_the_shape_is_compiled(llm):
    decoder = llm.fast_decoder = FastDecoder(llm.model, weights=None, compile="background")
    compiled_calls = []
    release = threading.Event()

    def slow_compiled(*args):  # stands in for torch.compile's first call: slow, then fast
        release.wait(timeout=30)
        compiled_calls.append(1)
        return decoder.eager_forward(*args)

    decoder.compiled_forward = slow_compiled
    plain = llm(PROMPT, max_new_tokens=6, fast_path=False)
    assert_same_events(plain, llm(PROMPT, max_new_tokens=6, fast_path=True))  # eager meanwhile
    assert "compiling in the background" in decoder.status()
    release.set()
    while decoder._compiling:
        time.sleep(0.01)
    assert (1, MIN_CACHE_LENGTH) in decoder.compiled and compiled_calls == [1]  # the scratch warm-up
    assert_same_events(plain, llm(PROMPT, max_new_tokens=6, fast_path=True))
    assert len(compiled_calls) == 1 + 5  # every decode step of that run went through the compiled forward
    llm.fast_decoder = FastDecoder(llm.model, weights=None)


@pytest.mark.slow
def test_the_compiled_cpu_step_gives_the_eager_steps_tokens(tokenizer):
    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    llm.fast_decoder = FastDecoder(llm.model, weights=None, compile=True)
    assert_same_events(llm(PROMPT, max_new_tokens=8, fast_path=False), llm(PROMPT, max_new_tokens=8, fast_path=True))
    assert llm.fast_decoder.compiled and llm.fast_decoder.compile_error is None


def test_an_unsupported_model_refuses_fast_path_true_and_defaults_to_the_plain_loop(tokenizer):
    llm = TextGenerationPipeline(tiny_llm("gpt2"), tokenizer)
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not a model the fast path implements"):
        llm(PROMPT, max_new_tokens=2, fast_path=True)
    assert len(llm(PROMPT, max_new_tokens=3, fast_path=None).token_ids) == 3
    assert llm.fast_decoder is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(use_cache=False), "use_cache=False"),
        (dict(speculative="prompt-lookup"), "speculative decoding"),
        (dict(fast_path="yes"), "fast_path must be True, False or None"),
    ],
)
def test_requests_the_fast_path_cannot_serve_get_a_clear_error(llm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        llm(PROMPT, max_new_tokens=2, **{"fast_path": True, **kwargs})


def test_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        FastDecoder(tiny_llm("llama"), graph=True)


# ---------------------------------------------------------------------------------------------
# The CUDA graph (run where a GPU is present)


@pytest.fixture(scope="module")
def cuda_llm(tokenizer):
    return TextGenerationPipeline(tiny_llm("llama").to("cuda"), tokenizer)


@cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compile+graph"])
def test_cuda_graph_decode_matches_the_plain_loop(cuda_llm, compile):
    cuda_llm.fast_decoder = FastDecoder(cuda_llm.model, compile=compile)
    plain = cuda_llm(PROMPT, max_new_tokens=16, fast_path=False)
    fast = cuda_llm(PROMPT, max_new_tokens=16)  # None: on for CUDA
    session = cuda_llm.fast_decoder.last_session
    assert isinstance(session.step, CapturedStep) and session.capture_s is not None and session.warmup_s is not None
    assert_same_events(plain, fast)
    assert all(e.ms > 0 for e in fast.steps[1:])  # CUDA-event timings around each replay
    plain_batch = cuda_llm(PROMPTS, max_new_tokens=8, fast_path=False)
    for plain_output, fast_output in zip(plain_batch, cuda_llm(PROMPTS, max_new_tokens=8)):
        assert_same_events(plain_output, fast_output)


@cuda
def test_cuda_graph_sampling_draws_the_plain_loops_tokens(cuda_llm):
    cuda_llm.fast_decoder = FastDecoder(cuda_llm.model, compile=False)
    settings = dict(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=11)
    plain = cuda_llm(PROMPT, max_new_tokens=16, fast_path=False, **settings)
    assert_same_events(plain, cuda_llm(PROMPT, max_new_tokens=16, **settings))


@cuda
def test_cuda_bf16_graph_decode_stays_close_to_the_plain_loop(tokenizer):
    llm = TextGenerationPipeline(tiny_llm("qwen2").to("cuda", torch.bfloat16), tokenizer)
    llm.fast_decoder = FastDecoder(llm.model, compile=False)
    plain = llm(PROMPT, max_new_tokens=16, fast_path=False)
    fast = llm(PROMPT, max_new_tokens=16)
    # bf16 rounding differs between fused and separate matmuls: the first tokens must agree
    assert fast.token_ids[:4] == plain.token_ids[:4]


# ---------------------------------------------------------------------------------------------
# The diffusion lane


def test_a_failing_compiled_model_falls_back_to_eager_and_says_so_once(monkeypatch):
    plain = generate_image(studio_pipeline(tiny_sd_components(), fast_path=True))

    def compile_that_fails(module, *args, **kwargs):  # what a missing C++ compiler looks like
        def failing(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found")

        module._compiled_call_impl = failing

    monkeypatch.setattr(torch.nn.Module, "compile", compile_that_fails)
    pipe = studio_pipeline(tiny_sd_components(), fast_path=True)
    enable_fast_path(pipe, compile=True)
    first = generate_image(pipe)
    np.testing.assert_allclose(first.pixels, plain.pixels, atol=1e-5)
    notices = " ".join(step.notice for step in first.steps if step.notice)
    for model in ("denoiser", "vae decoder"):  # the preview's colour fit calls the VAE first: both on step 0
        assert f"compiling the {model} failed (InductorError: no working C++ compiler found); it runs uncompiled" in notices
    assert pipe.denoiser._compiled_call_impl is None and pipe.vae.decoder._compiled_call_impl is None
    assert all(step.notice is None for step in generate_image(pipe).steps)  # told once, not retried


def test_sequential_cfg_keeps_both_answers_of_a_cuda_graph_denoiser(monkeypatch):
    """With a CUDA-graph compile mode the compiled call returns the same static buffers every
    time, so sequential CFG's second call would overwrite the first's answer: it is copied out."""
    plain = generate_image(studio_pipeline(tiny_sd_components(), fast_path=True), cfg_mode="sequential")

    def compile_into_static_buffers(module, *args, **kwargs):  # what replaying a CUDA graph looks like
        buffers = {}

        def replay(*args, **kwargs):
            out = module._call_impl(*args, **kwargs)
            values = (out,) if isinstance(out, torch.Tensor) else out
            kept = buffers.setdefault(tuple(v.shape for v in values), [v.clone() for v in values])
            for buffer, value in zip(kept, values):
                buffer.copy_(value)
            return kept[0] if isinstance(out, torch.Tensor) else tuple(kept)

        module._compiled_call_impl = replay

    monkeypatch.setattr(torch.nn.Module, "compile", compile_into_static_buffers)
    pipe = studio_pipeline(tiny_sd_components(), fast_path=True)
    enable_fast_path(pipe, compile=True, mode="reduce-overhead")
    np.testing.assert_allclose(generate_image(pipe, cfg_mode="sequential").pixels, plain.pixels, atol=1e-5)


def test_diffusion_fast_path_keeps_the_image_and_the_studio_attention():
    plain = generate_image(studio_pipeline(tiny_sd_components()))
    pipe = studio_pipeline(tiny_sd_components(), fast_path=True)  # the same seeded weights, then laid out for speed
    report = pipe.fast_path_report
    assert report.channels_last == ["denoiser", "vae"] and report.fused_attention["denoiser"] > 0
    assert pipe.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    attentions = [m for m in pipe.denoiser.modules() if hasattr(m, "fused_projections")]
    assert all(m.fused_projections and isinstance(m.processor, StudioAttnProcessor) for m in attentions)
    fast = generate_image(pipe)
    np.testing.assert_allclose(fast.pixels, plain.pixels, atol=1e-4)
    with backends.use(attention="eager"):  # the kernel choice still reaches the fused layers
        np.testing.assert_allclose(generate_image(pipe).pixels, plain.pixels, atol=1e-4)
    # the separate projections are kept but not read: the weight bytes are those of the plain path
    assert pipe.weight_bytes == studio_pipeline(tiny_sd_components()).weight_bytes
    assert warm_up(pipe, height=SIZE, width=SIZE) == pipe.fast_path_report.compile_s > 0


def test_diffusion_fast_path_on_a_class_conditioned_dit():
    plain = studio_pipeline(tiny_dit_components(), class_ids={"goldfish": 1})("goldfish", steps=3, guidance_scale=4.0)
    pipe = studio_pipeline(tiny_dit_components(), class_ids={"goldfish": 1}, fast_path=True)
    assert pipe.fast_path_report.fused_attention["denoiser"] == 2
    np.testing.assert_allclose(pipe("goldfish", steps=3, guidance_scale=4.0).pixels, plain.pixels, atol=1e-4)


@pytest.mark.slow
def test_the_compiled_denoiser_is_one_graph_that_follows_the_attention_choice():
    """Each attention reads the kernel use() chose; in compiled code that read must not break the
    graph (it did, at every attention: compiling then gained nothing) nor be frozen into it."""
    from torch._dynamo.utils import counters

    def image(pipe):
        return pipe("goldfish", steps=2, guidance_scale=4.0).pixels

    plain = image(studio_pipeline(tiny_dit_components(), class_ids={"goldfish": 1}))
    pipe = studio_pipeline(tiny_dit_components(), class_ids={"goldfish": 1}, fast_path=True)
    enable_fast_path(pipe, compile=True, mode="default")  # no autotuning: a test, not a benchmark
    counters.clear()
    np.testing.assert_allclose(image(pipe), plain, atol=1e-4)
    assert not pipe.fast_path_report.compile_errors and not counters["graph_break"]
    graphs = counters["stats"]["unique_graphs"]  # the denoiser, the VAE decoder per batch size it decoded
    with backends.use(attention="eager"):
        np.testing.assert_allclose(image(pipe), plain, atol=1e-4)
    assert counters["stats"]["unique_graphs"] > graphs  # recompiled for the kernel chosen
    assert not counters["graph_break"]


@pytest.mark.slow
def test_a_background_compile_runs_new_shapes_eagerly_until_they_are_compiled():
    from torch._dynamo.utils import counters

    def image(pipe):
        return pipe("goldfish", steps=2, guidance_scale=4.0).pixels

    plain = image(studio_pipeline(tiny_dit_components(), class_ids={"goldfish": 1}))
    pipe = studio_pipeline(tiny_dit_components(), class_ids={"goldfish": 1}, fast_path=True)
    report = enable_fast_path(pipe, compile="background", mode="default")
    counters.clear()
    first = image(pipe)  # eagerly, while its shapes compile
    started = {name for name, *_ in set(report.compiled_shapes) | report.compiling}
    deadline = time.monotonic() + 300
    while report.compiling and time.monotonic() < deadline:  # (a compile cut short at exit aborts the interpreter)
        time.sleep(0.2)
    np.testing.assert_allclose(first, plain, atol=1e-4)
    assert started == {"denoiser", "vae decoder"}
    assert not report.compiling and not report.compile_errors
    assert "denoiser and vae decoder compiled (default)" in report.status() and "input shape(s) in" in report.status()
    graphs = counters["stats"]["unique_graphs"]
    np.testing.assert_allclose(image(pipe), plain, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs  # the request found its shapes compiled


@pytest.mark.slow
def test_an_adapter_on_a_compiled_denoiser_is_neither_skipped_nor_kept(lora_folder):
    """torch.compile does not guard on forward hooks: compiled code traced without an adapter's
    hooks would skip them, and traced with them would keep them for the base model's runs."""
    plain = studio_pipeline(tiny_sd_components())
    plain.load_adapter(str(lora_folder), name="style")
    base, adapted = generate_image(plain).pixels, generate_image(plain, adapter="style").pixels
    pipe = studio_pipeline(tiny_sd_components(), fast_path=True)
    pipe.load_adapter(str(lora_folder), name="style")
    enable_fast_path(pipe, compile=True, mode="default")  # no autotuning: a test, not a benchmark
    np.testing.assert_allclose(generate_image(pipe).pixels, base, atol=1e-4)
    np.testing.assert_allclose(generate_image(pipe, adapter="style").pixels, adapted, atol=1e-4)
    np.testing.assert_allclose(generate_image(pipe).pixels, base, atol=1e-4)


def test_an_adapter_run_waits_while_a_background_compile_traces(lora_folder):
    pipe = studio_pipeline(tiny_sd_components(), fast_path=True)
    pipe.load_adapter(str(lora_folder), name="style")
    finished = {}

    def run(adapter):
        generate_image(pipe, adapter=adapter)
        finished[adapter] = True

    with pipe.fast_path_report.tracing:  # as a background compile holds it while it runs the models
        runs = [threading.Thread(target=run, args=(adapter,)) for adapter in (None, "style")]
        for thread in runs:
            thread.start()
        runs[0].join(60)
        time.sleep(0.5)
        assert finished == {None: True}  # the base model's run needs no wait; the adapter's hooks do
    runs[1].join(60)
    assert finished == {None: True, "style": True}


def test_a_module_with_forward_hooks_runs_uncompiled(monkeypatch):
    """An unmerged LoRA adapter hooks the denoiser's layers with new closures on every call,
    which compiled code would recompile for each time: the module runs eagerly while they are on."""
    compiled_calls = []

    def compile_that_counts(module, *args, **kwargs):
        def counted(*args, **kwargs):
            compiled_calls.append(module)
            return module._call_impl(*args, **kwargs)

        module._compiled_call_impl = counted

    monkeypatch.setattr(torch.nn.Module, "compile", compile_that_counts)
    pipe = studio_pipeline(tiny_dit_components(), class_ids={"goldfish": 1}, fast_path=True)
    enable_fast_path(pipe, compile=True)
    pipe("goldfish", steps=1)
    assert pipe.denoiser in compiled_calls
    compiled_calls.clear()
    layer = next(m for m in pipe.denoiser.modules() if isinstance(m, torch.nn.Linear))
    handle = layer.register_forward_hook(lambda module, inputs, output: output)
    pipe("goldfish", steps=1)
    handle.remove()
    assert pipe.denoiser not in compiled_calls and pipe.vae.decoder in compiled_calls


def test_diffusion_precision_reaches_the_fused_layers():
    pipe = studio_pipeline(tiny_sd_components(), precision="bf16")
    enable_fast_path(pipe)
    fused = [m.to_qkv for m in pipe.denoiser.modules() if getattr(m, "to_qkv", None) is not None]
    assert fused and all(isinstance(layer, PrecisionLinear) and layer.precision == "bf16" for layer in fused)


def test_diffusion_fast_path_is_off_by_default_on_the_cpu():
    assert studio_pipeline(tiny_sd_components()).fast_path_report is None


@cuda
def test_cuda_diffusion_fast_path_with_compile_stays_within_tolerance():
    def pipe(**kwargs):
        parts = tiny_sd_components()
        parts = {k: v.to("cuda", torch.float16) if isinstance(v, torch.nn.Module) else v for k, v in parts.items()}
        return studio_pipeline(parts, **kwargs)

    plain = generate_image(pipe(fast_path=False))
    fast_pipe = pipe()  # None: on for CUDA
    enable_fast_path(fast_pipe, compile=True, mode="default")  # no autotuning: a test, not a benchmark
    seconds = warm_up(fast_pipe, height=SIZE, width=SIZE, guidance_scale=5.0)
    assert fast_pipe.fast_path_report.compile_s == seconds > 0
    np.testing.assert_allclose(generate_image(fast_pipe).pixels, plain.pixels, atol=2e-2)


@pytest.mark.slow
def test_a_shape_compiled_in_the_warm_up_does_not_compile_again_on_the_first_request(tokenizer):
    from torch._dynamo.utils import counters

    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    llm.fast_decoder = FastDecoder(llm.model, weights=None, compile="background")
    llm.fast_decoder.warm_up(1, MIN_CACHE_LENGTH)  # what the app does at start (here in the foreground)
    compiled = counters["stats"]["unique_graphs"]
    out = llm(PROMPT, max_new_tokens=6)
    assert counters["stats"]["unique_graphs"] == compiled  # the request found the step compiled as it needs it
    assert not llm.fast_decoder.compiling and out.finish_reason == "length"
