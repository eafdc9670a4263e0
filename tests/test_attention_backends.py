"""Every attention backend, built in or registered, against the float64 reference on the battery
of studio.backends.checks: the same cases a plugin's kernel must pass before it runs."""

import contextvars
import importlib
import threading
import warnings

import pytest
import torch

from studio import backends
from studio.backends import BackendError, checks

CPU = torch.device("cpu")
RUNNABLE = [b.name for b in backends.available(CPU, torch.float32) if b.kind == "attention" and b.available]
FAST = [name for name in RUNNABLE if name != "flex"]  # flex compiles per shape: tested on fewer cases


def inputs(**shape):
    """q, k, v of the battery's default shape (batch 2, 4 heads, 16 x 16, head_dim 64), changed by `shape`."""
    return checks.AttentionCase("test", **shape).inputs(CPU, torch.float32)[:3]


def check(name, case, dtype=torch.float32):
    error = checks.attention_error(lambda *args: backends.attention(*args, backend=name), case, CPU, dtype)
    tolerance = checks.ATTENTION_TOLERANCE[dtype]
    assert error <= tolerance, f"{name} on {case}: max error {error:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", checks.ATTENTION_CASES)
@pytest.mark.parametrize("name", FAST)
def test_backend_matches_float64_reference(name, case, dtype):
    check(name, checks.ATTENTION_CASES[case], dtype)


def test_the_battery_covers_what_the_layout_allows():
    needs = [case.needs() for case in checks.ATTENTION_CASES.values()]
    assert all(any(n[capability] for n in needs) for capability in ("causal", "masks", "gqa", "cross"))
    assert {case.mask for case in checks.ATTENTION_CASES.values()} == {None, "padding", "additive", "empty-row"}
    assert {case.head_dim for case in checks.ATTENTION_CASES.values()} >= {32, 64, 80, 128}
    decode = checks.ATTENTION_CASES["decode-causal"]
    assert decode.q_len == 1 and decode.causal and decode.needs()["cross"]


@pytest.mark.parametrize("name", FAST)
def test_a_query_that_sees_no_key_gets_zeros(name):
    q, k, v = inputs(q_len=4, kv_len=4)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, 1] = False  # row 1 of sequence 0 sees nothing
    out = backends.attention(q, k, v, mask=mask, backend=name)
    assert torch.isfinite(out).all()
    assert (out[0, :, 1] == 0).all()


def test_a_left_padded_row_that_causal_hides_everything_from_gets_zeros(monkeypatch):
    """A left-padded prompt: keys 0-1 are padding. With causal applied, queries 0 and 1 see keys
    0-1 only, which are padding: they see nothing, though the mask alone (keys 2-3 visible) says
    otherwise. Whatever a kernel returns there (NaN, from a softmax over nothing), those rows must
    be zeros."""
    kernels = importlib.import_module("studio.backends.attention")._KERNELS  # the module, not backends.attention()
    monkeypatch.setitem(kernels, "tiled", lambda q, k, v, causal, mask, scale: torch.full_like(q, float("nan")))
    q, k, v = inputs(q_len=4, kv_len=4)
    padding = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    padding[0, ..., :2] = False
    out = backends.attention(q, k, v, causal=True, mask=padding, backend="tiled")
    assert (out[0, :, :2] == 0).all()  # zeroed, not NaN
    assert torch.isnan(out[0, :, 2:]).all() and torch.isnan(out[1]).all()  # rows that see keys: the kernel's own


def test_auto_moves_on_when_its_kernel_fails_on_real_inputs(monkeypatch):
    """auto probes kernels on small square inputs; a kernel that then raises on real ones gives
    way to the next in line, for inputs of that kind from then on, instead of failing the run."""
    attention = importlib.import_module("studio.backends.attention")
    monkeypatch.setattr(attention, "_AUTO_FAILED", {})
    chosen = backends.choose_attention(*inputs()).name
    calls = []

    def fails_on_real_shapes(*args):
        calls.append(1)
        raise RuntimeError("cuDNN Frontend error: No execution plans support the graph")

    monkeypatch.setitem(attention._KERNELS, chosen, fails_on_real_shapes)
    q, k, v = inputs(q_len=1, kv_len=77)
    expected = backends.attention(q, k, v, backend="sdpa")
    torch.testing.assert_close(backends.attention(q, k, v), expected)
    torch.testing.assert_close(backends.attention(q, k, v), expected)
    assert len(calls) == 1  # passed over the second time
    assert "raised on real inputs of this kind" in backends.choose_attention(q, k, v, excluded=frozenset({chosen})).reason


@pytest.mark.slow
@pytest.mark.parametrize("case", ["causal", "gqa-causal", "decode-causal", "padding-causal"])
def test_flex_matches_float64_reference(case):
    if "flex" not in RUNNABLE:
        pytest.skip(backends.attention_info("flex", CPU, torch.float32).reason)
    check("flex", checks.ATTENTION_CASES[case])


def test_eager_hands_back_the_weights():
    q, k, v = inputs(q_len=5, kv_len=7)
    out, weights = backends.attention(q, k, v, causal=True, backend="eager", return_weights=True)
    assert weights.shape == (2, 4, 5, 7)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert (weights[..., 0, 4:] == 0).all()  # query 0 sees keys 0..2 only (bottom-right alignment)
    torch.testing.assert_close(weights @ v, out)


def test_tiled_never_builds_the_score_matrix():
    """The tiled kernel's largest intermediate is block_q x block_k, not q_len x kv_len."""
    from torch.utils._python_dispatch import TorchDispatchMode

    biggest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                biggest.append(out.shape[-2:] if out.dim() >= 2 else ())
            return out

    q, k, v = inputs(batch=1, heads=1, kv_heads=1, q_len=256, kv_len=256, head_dim=32)
    with Watch():
        backends.attention(q, k, v, backend="tiled")
    assert (256, 256) not in [tuple(s) for s in biggest]
    assert (64, 64) in [tuple(s) for s in biggest]


def test_use_scopes_the_choice_and_restores_it():
    q, k, v = inputs()
    assert backends.current().attention is None  # nothing chosen: a pipeline default, else auto
    with backends.use(attention="eager"):
        assert backends.current().attention == "eager"
        backends.attention(q, k, v, return_weights=True)  # eager is the one chosen
        with backends.use(attention="tiled"):
            assert backends.current().attention == "tiled"
        assert backends.current().attention == "eager"
    assert backends.current().attention is None  # nothing chosen: a pipeline default, else auto


def test_compiled_code_follows_the_scope_in_one_graph():
    """torch.compile cannot read the context variable use() sets: compiled code reads a
    thread-local copy, guarded, so a call under another choice recompiles instead of keeping the
    kernel it traced first, and a generator resumed on another thread gets its own context's."""
    @torch.compile(fullgraph=True, backend="eager")  # fullgraph: a graph break here would raise
    def chosen(x):
        return x + {"eager": 1, "tiled": 2}.get(backends.current().attention, 0)

    x = torch.zeros(1)
    assert chosen(x).item() == 0
    with backends.use(attention="eager"):
        assert chosen(x).item() == 1
        with backends.use(attention="tiled"):
            assert chosen(x).item() == 2
        assert chosen(x).item() == 1
    assert chosen(x).item() == 0

    with backends.use(attention="tiled"):
        context = contextvars.copy_context()  # what a resumed generator carries
    seen = []

    def elsewhere():  # another thread, running in that context
        with backends.for_compiled_code():
            seen.append(chosen(x).item())

    thread = threading.Thread(target=context.run, args=(elsewhere,))
    thread.start()
    thread.join()
    assert seen == [2]


def test_compiled_code_runs_a_named_kernel_without_tracing_its_availability_check():
    """The probe and its caches are Python for the eager path: traced, dynamo warns that it skips
    the cache and would run the probe inside the graph."""
    q, k, v = inputs()

    @torch.compile(fullgraph=True, backend="eager")
    def run(q, k, v):
        return backends.attention(q, k, v, causal=True, backend="sdpa")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run(q, k, v)
    torch.testing.assert_close(out, backends.attention(q, k, v, causal=True, backend="sdpa"))


def test_auto_reports_its_choice():
    q, k, v = inputs()
    choice = backends.choose_attention(q, k, v)
    assert choice.name in RUNNABLE and choice.name != "auto"
    assert "cpu" in choice.reason
    check("auto", checks.ATTENTION_CASES["causal"])


def test_available_lists_every_backend_with_a_reason_when_not():
    infos = backends.available(CPU, torch.float32)
    names = [i.name for i in infos if i.kind == "attention"]
    assert names == backends.attention_names()
    assert names[: len(backends.ATTENTION_BACKENDS)] == list(backends.ATTENTION_BACKENDS)  # built-ins first
    for info in infos:
        assert info.available or info.reason, info
    cudnn = backends.attention_info("sdpa-cudnn", CPU, torch.float32)
    assert not cudnn.available and "cpu" in cudnn.reason


def test_unknown_backend_names_the_alternatives():
    q, k, v = inputs()
    with pytest.raises(BackendError, match="unknown attention backend 'flash3'.*available: eager"):
        backends.attention(q, k, v, backend="flash3")
    with pytest.raises(BackendError, match="unknown attention backend"):
        with backends.use(attention="nope"):
            pass


def test_unavailable_backend_says_why_and_never_falls_back():
    q, k, v = inputs()
    with pytest.raises(BackendError, match="'sdpa-cudnn' is unavailable: .*available: .*sdpa-flash"):
        backends.attention(q, k, v, backend="sdpa-cudnn")


def test_xformers_is_optional_and_explained():
    info = backends.attention_info("xformers", CPU, torch.float32)
    if not info.available:
        assert "xformers" in info.reason


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda q, k, v: (q[0], k, v), r"q as \[batch, heads, seq_len, head_dim\]"),
        (lambda q, k, v: (q, k.half(), v), "share one floating dtype"),
        (lambda q, k, v: (q, k[..., :32], v), "share head_dim"),
        (lambda q, k, v: (q, k[:, :3], v[:, :3]), r"kv_heads \(3\) must divide heads \(4\)"),
        (lambda q, k, v: (q, k[:1], v[:1]), "share the batch size"),
        (lambda q, k, v: (q, k, v[:, :, :5]), "k and v must agree"),
    ],
)
def test_bad_shapes_and_dtypes_are_named(bad, message):
    with pytest.raises(BackendError, match=message):
        backends.attention(*bad(*inputs()), backend="sdpa")


def test_bad_mask_and_causal_are_named():
    q, k, v = inputs(q_len=8, kv_len=4)
    with pytest.raises(BackendError, match="more queries"):
        backends.attention(q, k, v, causal=True)
    with pytest.raises(BackendError, match="does not broadcast"):
        backends.attention(q, k, v, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(BackendError, match="only the eager backend"):
        backends.attention(q, k, v, backend="sdpa", return_weights=True)
