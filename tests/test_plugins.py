"""Plugins: anyone's attention kernel or matmul precision, checked against the float64 reference
before it runs, then everywhere the built-ins are; a bad one is refused by name and the studio
serves on. The example plugin (examples/studio-plugin-example, installed by `make test`'s set-up)
drives both lanes."""

import importlib.metadata
import importlib.util
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import generate_image, studio_pipeline, tiny_llm, tiny_sd_components
from torch import nn

from studio import backends
from studio.backends import BackendError, checks, libraries, plugins
from studio.backends.registry import SOURCES
from studio.cli import main
from studio.profiling import ceilings_for

CPU = torch.device("cpu")
EXAMPLE = ("chunked", "int8-group")

try:
    importlib.metadata.distribution("studio-plugin-example")
except importlib.metadata.PackageNotFoundError:
    pytest.fail(
        "the example plugin is not installed in this environment: run `make test` (its set-up installs it) or "
        ".venv/bin/pip install --no-deps -e examples/studio-plugin-example",
        pytrace=False,
    )


@pytest.fixture
def register():
    """backends.register_attention / register_precision by kind, unregistered after the test."""
    names = []

    def register(kind, name, fn, **kwargs):
        kwargs.setdefault("description", f"a test {kind}")
        (backends.register_attention if kind == "attention" else backends.register_precision)(name, fn, **kwargs)
        names.append(name)
        return name

    yield register
    for name in names:
        if plugins.registered(name) is not None:
            backends.unregister(name)


def textbook(q, k, v, causal, mask, scale):
    """A correct kernel for the tests to break: the reference's steps in the inputs' dtype."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if causal:
        q_len, kv_len = q.shape[-2], k.shape[-2]
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        scores = scores.masked_fill(~visible, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.float()
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ v.float()).to(q.dtype)


def qkv(heads=4, kv_heads=4, q_len=8, kv_len=8):
    case = checks.AttentionCase("test", heads=heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len)
    return case.inputs(CPU, torch.float32)[:3]


def still_serving():
    """The studio's other backends run after a plugin went wrong."""
    q, k, v = qkv()
    backends.attention(q, k, v, causal=True, backend="sdpa")
    assert {b.name for b in backends.available(CPU) if b.available} >= {"eager", "sdpa", "int8"}


# ---------------------------------------------------------------------------------------------
# Discovery and the example plugin


def test_the_example_plugin_is_discovered_through_its_entry_point():
    (example,) = [s for s in backends.installed_plugins() if s.name == "example"]
    assert example.error is None and example.backends == EXAMPLE
    assert example.value == "studio_plugin_example:register" and example.distribution.startswith("studio-plugin-example")
    infos = {b.name: b for b in backends.available(CPU, torch.float32)}
    for name, kind in zip(EXAMPLE, ("attention", "precision")):
        assert infos[name].kind == kind and infos[name].available, infos[name]
        assert "plugin 'example' from studio-plugin-example" in infos[name].description


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_the_example_passes_the_check_in_every_dtype(dtype):
    assert backends.attention_info("chunked", CPU, dtype).available
    assert backends.precision_info("int8-group", CPU, dtype).available


def test_the_example_kernel_matches_the_reference_on_every_case_and_never_holds_the_whole_score_matrix():
    for case in checks.ATTENTION_CASES.values():
        error = checks.attention_error(lambda *args: backends.attention(*args, backend="chunked"), case, CPU, torch.float32)
        assert error < checks.ATTENTION_TOLERANCE[torch.float32], case
    q, k, v = qkv(q_len=100, kv_len=100)
    with backends.use(attention="chunked"):
        out = backends.attention(q, k, v, causal=True)
    torch.testing.assert_close(out, backends.attention(q, k, v, causal=True, backend="eager"))


def test_the_example_precision_is_int8_per_group_and_restores_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32, bias=False))
    x = torch.randn(5, 64)
    expected = model(x)
    parameters = [p.clone() for p in model.parameters()]
    report = backends.apply_precision(model, "int8-group")
    assert backends.precision_of(model) == "int8-group" and report.changed == ["0", "2"]
    assert report.bytes_after < report.bytes_before / 3  # int8 weights plus one float32 scale per 32 of them
    assert [p.shape for p in model.parameters()] == [p.shape for p in parameters]  # still only the originals
    assert 1e-4 < checks.relative_error(model(x), expected) < 2e-2
    backends.restore_precision(model)
    assert all(torch.equal(p, saved) for p, saved in zip(model.parameters(), parameters))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Checked before it runs


def test_a_kernel_is_checked_once_per_device_and_dtype(register):
    calls = []

    def counted(*args):
        calls.append(args[0].dtype)
        return textbook(*args)

    register("attention", "counted", counted)
    assert not calls  # registering runs nothing
    q, k, v = qkv()
    backends.attention(q, k, v, backend="counted")
    battery = len(checks.ATTENTION_CASES)
    assert len(calls) == battery + 1  # the battery, then the call itself
    backends.attention(q, k, v, causal=True, backend="counted")
    assert backends.attention_info("counted", CPU, torch.float32).available
    assert len(calls) == battery + 2
    assert backends.attention_info("counted", CPU, torch.bfloat16).available  # a new dtype: checked again
    assert len(calls) == 2 * battery + 2


def test_a_kernel_with_top_left_causal_alignment_is_refused_naming_the_case_and_the_error(register):
    def top_left(q, k, v, causal, mask, scale):  # SDPA's own is_causal: right only when q_len == kv_len
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)

    register("attention", "top-left", top_left)
    info = backends.attention_info("top-left", CPU, torch.float32)
    assert not info.available
    assert "failed the check against the float64 reference on cpu float32" in info.reason
    assert "case 'decode-causal' (heads 4, kv_heads 4, q_len 1, kv_len 23" in info.reason
    assert "max error" in info.reason and "> tolerance 2e-05" in info.reason
    q, k, v = qkv()
    with pytest.raises(BackendError, match=r"'top-left' is unavailable: failed the check.*decode-causal.*available: eager"):
        backends.attention(q, k, v, backend="top-left")  # refused, not run on inputs it would get right
    with pytest.raises(BackendError, match="decode-causal"), backends.use(attention="top-left"):
        backends.attention(q, k, v)  # a scope never falls back either
    still_serving()


def test_undeclared_capabilities_are_left_out_of_the_check_and_refused_per_call(register):
    def no_masks_no_groups(q, k, v, causal, mask, scale):
        assert mask is None and q.shape[1] == k.shape[1], "given what it does not declare"
        return textbook(q, k, v, causal, None, scale)

    register("attention", "plain", no_masks_no_groups, masks=False, gqa=False)
    assert backends.attention_info("plain", CPU, torch.float32).available
    q, k, v = qkv()
    backends.attention(q, k, v, causal=True, backend="plain")
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    refused = r"'plain' cannot take these inputs: it was registered without masks \(masks=False, by module test_plugins\)"
    with pytest.raises(BackendError, match=refused + "; choose another backend"):
        backends.attention(q, k, v, mask=mask, backend="plain")
    q, k, v = qkv(heads=8, kv_heads=2)
    with pytest.raises(BackendError, match=r"without grouped-query attention \(8 heads over 2 K/V heads\) \(gqa=False, by"):
        backends.attention(q, k, v, backend="plain")


def test_declared_head_sizes_shape_the_check_and_the_calls(register):
    seen = set()

    def sized(q, k, v, causal, mask, scale):
        seen.add(q.shape[-1])
        return textbook(q, k, v, causal, mask, scale)

    register("attention", "sized", sized, head_dims=(32, 128))
    assert backends.attention_info("sized", CPU, torch.float32).available
    assert seen == {32, 128}  # every case ran at the nearest size it takes
    q, k, v = qkv()  # head_dim 64
    with pytest.raises(BackendError, match=r"without head_dim 64 \(head_dims=\(32, 128\), by module"):
        backends.attention(q, k, v, backend="sized")


@pytest.mark.parametrize(
    "kernel, message",
    [
        (lambda *inputs: textbook(*inputs)[..., :-1, :],
         r"case 'self' .*returned a float32 tensor of shape \(2, 4, 15, 64\) on cpu; "
         r"the contract is a float32 tensor of shape \(2, 4, 16, 64\)"),
        (lambda *inputs: textbook(*inputs).double(),
         "returned a float64 tensor"),
        (lambda *inputs: 1 / 0, r"case 'self' .*'broken' \(module test_plugins\) raised ZeroDivisionError: division by zero"),
        (lambda *inputs: textbook(*inputs) * math.nan, "case 'self' .*returned NaN"),
        (lambda *inputs: (textbook(*inputs), None), "returned a tuple, not a tensor"),
    ],
    ids=["shape", "dtype", "exception", "nan", "tuple"],
)
def test_a_broken_kernel_is_refused_naming_it_and_the_studio_serves_on(register, kernel, message):
    register("attention", "broken", kernel)
    info = backends.attention_info("broken", CPU, torch.float32)
    assert not info.available
    assert info.reason.startswith("failed the check against the float64 reference on cpu float32: ")
    assert re.search(message, info.reason), info.reason
    still_serving()


@pytest.mark.parametrize(
    "name, fn, kwargs, message",
    [
        ("sdpa", textbook, {}, "'sdpa' is the name of a built-in attention kernel and cannot be taken"),
        ("int8", textbook, {}, "'int8' is the name of a built-in precision and cannot be taken"),
        ("chunked", textbook, {}, r"'chunked' is already registered, as attention, by plugin 'example' from studio-plugin-ex"),
        ("Flash 3", textbook, {}, "a backend's name is lowercase letters"),
        ("three", lambda q, k, v: q, {}, r"cannot be called as fn\(q, k, v, causal, mask, scale\)"),
        ("noop", None, {}, "NoneType is not callable"),
        ("nodesc", textbook, {"description": " "}, "a description .* is required"),
        ("dims", textbook, {"head_dims": [0]}, "head_dims must be positive integers"),
        ("dev", textbook, {"devices": ["gpu0"]}, "devices must be device types"),
        ("dt", textbook, {"dtypes": [torch.int8]}, "dtypes must be floating torch dtypes"),
    ],
)
def test_bad_registrations_are_named(register, name, fn, kwargs, message):
    with pytest.raises(BackendError, match=message):
        register("attention", name, fn, **kwargs)
    if name != "chunked":
        assert plugins.registered(name) is None  # nothing half-registered
    assert plugins.registered("chunked").fn is not textbook  # the example's kernel kept its name
    still_serving()


def test_unregister_only_what_was_registered(register):
    register("attention", "gone", textbook)
    backends.unregister("gone")
    assert "gone" not in backends.attention_names()
    with pytest.raises(BackendError, match="unknown attention backend 'gone'"):
        backends.use(attention="gone").__enter__()
    with pytest.raises(BackendError, match="'eager' is a built-in backend; only registered ones"):
        backends.unregister("eager")
    with pytest.raises(BackendError, match="no registered backend is named 'gone'; registered: .*chunked"):
        backends.unregister("gone")


# ---------------------------------------------------------------------------------------------
# Precisions: checked the same way


class Bf16Linear(nn.Module):
    """bf16 weights in an nn.Linear of its own (parameters, not buffers), float32 accumulate."""

    def __init__(self, linear):
        super().__init__()
        self.inner = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.inner.load_state_dict(linear.state_dict())
        self.inner.to(torch.bfloat16)

    def forward(self, x):
        return self.inner(x.to(torch.bfloat16)).to(x.dtype)


def test_a_registered_precision_keeps_the_models_parameters_its_own(register):
    register("precision", "bf16-own", Bf16Linear)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    count = len(list(model.parameters()))
    report = backends.apply_precision(model, "bf16-own")
    assert len(list(model.parameters())) == count  # the converted module's weights became buffers
    assert report.bytes_after == report.bytes_before // 2 + (32 + 16) * 2  # bf16 weights, and its bf16 biases
    assert model(torch.randn(3, 32)).dtype == torch.float32


class OffByOnePercent(nn.Module):
    """Right dtype, wrong numbers: every output 1 % too large."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x) * 1.01


class HalfOut(nn.Module):
    """Right numbers, wrong dtype: hands back float16 whatever it was given."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x).half()


@pytest.mark.parametrize(
    "convert, message",
    [
        (lambda layer: "not a module", "returned str"),
        (HalfOut, r"case 'bias' .*returned a float16 tensor of shape \(4, 8, 128\) on cpu; the contract is the input's dtype"),
        (lambda layer: OffByOnePercent(layer), r"case 'bias' .*relative error 1.0\de-02 > bound 4.3e-03 for float32"),
        (lambda layer: layer.requires_grad_(False).half().float(), "changed the original layer's weights"),
        (lambda layer: 1 / 0, r"'bad' \(module test_plugins\) failed to convert a 256 -> 128 layer: ZeroDivisionError"),
    ],
    ids=["not-a-module", "wrong-dtype", "wrong-numbers", "changes-the-original", "exception"],
)
def test_a_broken_precision_is_refused_naming_it_and_the_model_is_left_alone(register, convert, message):
    register("precision", "bad", convert)
    info = backends.precision_info("bad", CPU)
    assert not info.available and re.search(message, info.reason), info.reason
    model = nn.Sequential(nn.Linear(16, 16))
    backends.apply_precision(model, "int8")
    with pytest.raises(BackendError, match="precision 'bad' is not available on cpu: failed the check"):
        backends.apply_precision(model, "bad")
    assert backends.precision_of(model) == "int8"
    still_serving()


def int4(layer):
    """Weight-only int4 with per-channel scales: about 17 times int8's error (a step of max|w| / 7)."""
    converted = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    w = layer.weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 7
    with torch.no_grad():
        converted.weight.copy_(torch.round(w / scale) * scale)
        if layer.bias is not None:
            converted.bias.copy_(layer.bias)
    return converted.to(w.device, w.dtype)


def test_a_precision_declares_its_error_and_is_held_to_it(register):
    register("precision", "int4-strict", int4)  # claims bf16's error: refused
    assert "> bound" in backends.precision_info("int4-strict", CPU).reason
    register("precision", "int4", int4, max_error=0.1)
    assert backends.precision_info("int4", CPU).available
    with pytest.raises(BackendError, match="max_error 'int4' names no built-in format"):
        register("precision", "int4-x", int4, max_error="int4")


# ---------------------------------------------------------------------------------------------
# Everywhere the built-ins are: auto, the lanes, the bench, the CLI, the app


def test_auto_chooses_a_registered_kernel_only_where_it_declared_the_inputs_safe(register):
    register("attention", "fast", textbook, auto=True, masks=False)
    q, k, v = qkv()
    choice = backends.choose_attention(q, k, v, causal=True)
    assert choice.name == "fast" and "registered for auto" in choice.reason
    masked = backends.choose_attention(q, k, v, mask=torch.ones(1, 1, 1, 8, dtype=torch.bool))
    assert masked.name != "fast" and "skipped fast: " in masked.reason and "masks=False" in masked.reason
    assert "chunked" not in choice.reason  # not registered for auto: never a candidate


def test_an_unverified_kernel_is_never_auto(register):
    register("attention", "wrong", lambda q, k, v, causal, mask, scale: torch.zeros_like(q), auto=True)
    q, k, v = qkv()
    choice = backends.choose_attention(q, k, v)
    assert choice.name != "wrong" and "skipped wrong: failed the check" in choice.reason


@pytest.fixture
def chunked_calls(monkeypatch):
    """The q shapes and whether a mask came, of every call that reaches the example's kernel."""
    assert backends.attention_info("chunked", CPU, torch.float32).available  # checked before the spy goes in
    plugin, calls = plugins.registered("chunked"), []
    kernel = plugin.fn

    def spy(q, k, v, causal, mask, scale):
        calls.append((tuple(q.shape), tuple(k.shape), mask is not None))
        return kernel(q, k, v, causal, mask, scale)

    monkeypatch.setattr(plugin, "fn", spy)
    return calls


def test_the_llm_lane_runs_on_the_example_kernel_and_precision(tokenizer, chunked_calls):
    from pipelines.text_generation import TextGenerationPipeline

    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)  # grouped-query heads: 4 over 2
    prompts = ["The cat sat on the mat.", "Hi"]  # a padded batch: the mask reaches the kernel
    expected = llm(prompts, max_new_tokens=8, fast_path=False)
    with backends.use(attention="chunked"):
        chunked = llm(prompts, max_new_tokens=8, fast_path=False)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in expected]
    assert {(q[1], k[1]) for q, k, _ in chunked_calls} == {(4, 2)}  # the grouped heads reach it as they are
    assert all(masked for _, _, masked in chunked_calls)  # the padding mask too
    assert {q[2] for q, _, _ in chunked_calls} >= {1, 23}  # the prompt, then one token per step
    with backends.use(attention="chunked", precision="int8-group"):
        quantised = llm(prompts[0], max_new_tokens=8, fast_path=False)
        assert backends.precision_of(llm.model) == "int8-group"
    assert quantised.token_ids[:2] == expected[0].token_ids[:2]  # a sharp head: the first tokens survive int8
    again = llm(prompts, max_new_tokens=8, fast_path=False)  # outside the scope: the model's own layers again
    assert backends.precision_of(llm.model) is None
    assert [o.token_ids for o in again] == [o.token_ids for o in expected]


def test_the_diffusion_lane_runs_on_the_example_kernel_and_precision(chunked_calls):
    sd = studio_pipeline(tiny_sd_components())  # self- and cross-attention in the UNet, attention in the VAE
    small = dict(steps=2, height=16, width=16)
    reference = generate_image(sd, **small)
    with backends.use(attention="chunked"):
        np.testing.assert_allclose(generate_image(sd, **small).pixels, reference.pixels, atol=1e-5)
    assert any(q[2] != k[2] for q, k, _ in chunked_calls)  # cross-attention to the prompt's embeddings
    assert any(q[2] == k[2] for q, k, _ in chunked_calls)  # self-attention over the latent pixels
    with backends.use(attention="chunked", precision="int8-group"):
        quantised = generate_image(sd, **small)
    assert 0 < np.abs(quantised.pixels - reference.pixels).max() < 0.1


def test_the_bench_tables_list_the_registered_backends_next_to_the_built_ins():
    from studio import bench
    from studio.bench.results import attention_grid, precision_grid

    settings = bench.Settings.for_device("cpu")
    kernels = dict(attention_grid(settings, CPU, torch.float32, "llm"))
    precisions = dict(precision_grid(settings, CPU, torch.float32))
    assert kernels["chunked"] is None and precisions["int8-group"] is None  # run, not skipped
    assert "cuda" in kernels["sage"]
    results = bench.Results(settings)
    results.ceilings = ceilings_for("cpu")
    table = bench.AttentionBench(settings, results)
    assert table.kernels()[-1] == "chunked"
    row = table.run("chunked", seq=256, repeats=1, warmup=0)
    assert row["status"] == "ok" and row["ms"] > 0


def test_studio_backends_lists_plugins_and_a_broken_one_with_its_error(capsys):
    broken = importlib.metadata.EntryPoint("broken", "studio_no_such_plugin:register", plugins.GROUP)
    half = importlib.metadata.EntryPoint("half", "test_plugins:register_half", plugins.GROUP)
    try:
        loaded = backends.load_entry_points([broken, half])
        assert [s.error for s in loaded] == [
            "ModuleNotFoundError: No module named 'studio_no_such_plugin'",
            "BackendError: 'chunked' is already registered, as attention, by plugin 'example' from "
            "studio-plugin-example 0.1.0 (plugin 'half' (test_plugins:register_half)); choose another name, "
            "or backends.unregister('chunked') first",
        ]
        assert "half-good" not in backends.attention_names()  # a plugin registers whole or not at all
        assert backends.load_entry_points([broken]) == []  # loaded once
        assert main(["backends", "--device", "cpu"]) == 0
        out = capsys.readouterr().out
        assert "attention chunked" in out and "precision int8-group" in out
        assert "plugin    example" in out and "loaded: chunked, int8-group (studio-plugin-example 0.1.0)" in out
        assert "FAILED to load: ModuleNotFoundError: No module named 'studio_no_such_plugin'" in out
        with pytest.raises(BackendError, match="plugins that failed to load .*broken \\(ModuleNotFoundError"):
            backends.use(attention="theirs").__enter__()
        still_serving()
    finally:
        SOURCES[:] = [s for s in SOURCES if s.name not in ("broken", "half")]


def register_half():
    """An entry point that registers one backend, then fails on the next."""
    backends.register_attention("half-good", textbook, description="registered before the failure")
    backends.register_attention("chunked", textbook, description="a name taken by the example")


def test_the_apps_backends_tab_and_menus_show_the_plugins():
    from studio.ui import _choices, backends_rows

    rows = {row[0]: row for row in backends_rows("cpu")}
    assert rows["chunked"][1:3] == ["attention", "yes"] and rows["int8-group"][1:3] == ["precision", "yes"]
    assert rows["example"][1:3] == ["plugin", "yes"] and "registers chunked, int8-group" in rows["example"][4]
    assert "chunked" in _choices("attention", "cpu") and "int8-group" in _choices("precision", "cpu")
    assert "sage" not in _choices("attention", "cpu")


# ---------------------------------------------------------------------------------------------
# The optional kernel libraries


@pytest.mark.skipif(importlib.util.find_spec("sageattention") is not None, reason="SageAttention is installed")
def test_sage_attention_absent_says_so():
    assert "declared for cuda only, not cpu" in backends.attention_info("sage", CPU, torch.bfloat16).reason
    reason = plugins.registered("sage").requirement(torch.device("cuda"), torch.bfloat16)  # asked on a GPU
    assert reason.startswith("SageAttention is not installed (pip install sageattention")


@pytest.mark.skipif(importlib.util.find_spec("kernels") is not None, reason="kernels is installed")
def test_hub_kernels_absent_says_so():
    reason = plugins.registered("hub-flash-attn").requirement(torch.device("cuda"), torch.float16)  # asked on a GPU
    assert reason.startswith("the Hugging Face kernels package is not installed (pip install kernels)")
    name = libraries.register_hub_attention("kernels-community/flash-attn3")  # a hub kernel by id
    try:
        assert name == "hub-flash-attn3"
        assert "declared for cuda only" in backends.attention_info(name, CPU, torch.bfloat16).reason
        reason = plugins.registered(name).requirement(torch.device("cuda"), torch.bfloat16)
        assert "kernels-community/flash-attn3 cannot be fetched" in reason
    finally:
        backends.unregister(name)


def test_a_device_that_is_not_there_says_so_for_every_backend():
    if torch.cuda.is_available():
        pytest.skip("CUDA is there")
    for info in backends.available("cuda"):
        assert info.reason == "CUDA is not available here (no NVIDIA GPU, or a CPU-only torch build)", info
