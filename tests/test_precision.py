"""Matmul precisions: each within its format's error of a float64 reference, reversible bit for
bit, and safe on real transformers and diffusers models (tied weights included)."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import plain_llm, tiny_unet
from torch import nn
from torch.overrides import TorchFunctionMode

from studio.backends import checks, precision
from studio.backends.precision import (
    PRECISIONS,
    apply_precision,
    precision_info,
    precision_of,
    restore_precision,
)
from studio.backends.registry import BackendError

torch.set_num_threads(1)

CPU_PRECISIONS = [name for name in PRECISIONS if precision_info(name, "cpu").available]

# The bounds each precision is held to on a random layer (and a registered one declares its own
# against): predicted from the formats' bits, in studio.backends.checks.ERROR_BOUNDS.
LLAMA_INT8_LOGITS_ERROR = 1.5e-2  # int8 error of 15 layers in a row, 2 blocks deep [7.8e-3]
UNET_ERROR = {"bf16": 3e-3, "int8": 3e-3}  # through 74 linear layers between fp32 convolutions [8.8e-4, 1.1e-3]


def small_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.GELU(),
        nn.LayerNorm(128),
        nn.Sequential(nn.Linear(128, 128), nn.SiLU()),
        nn.Linear(128, 64, bias=False),
    )


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


# --- availability and names ------------------------------------------------------------------


def test_precisions_in_order():
    assert PRECISIONS == ("fp32", "tf32", "bf16", "fp16", "int8", "fp8")


def test_cpu_runs_every_precision_but_tf32():
    # torch._scaled_mm has a CPU kernel in this torch, so fp8 is tested here too.
    assert CPU_PRECISIONS == ["fp32", "bf16", "fp16", "int8", "fp8"]
    info = precision_info("tf32", "cpu")
    assert info.kind == "precision" and not info.available
    assert "compute capability" in info.reason
    assert all(precision_info(name, "cpu").description for name in PRECISIONS)


def test_unknown_precision_raises_naming_the_alternatives():
    with pytest.raises(BackendError, match="unknown precision 'int4'; available: fp32, tf32, bf16, fp16, int8, fp8"):
        precision.check_name("int4")
    with pytest.raises(BackendError, match="int4"):
        apply_precision(small_mlp(), "int4")
    with pytest.raises(BackendError, match="int4"):
        precision_info("int4", "cpu")


def test_unavailable_precision_raises_and_leaves_the_model_as_it_was():
    model = small_mlp()
    apply_precision(model, "int8")
    with pytest.raises(BackendError) as error:
        apply_precision(model, "tf32")
    message = str(error.value)
    assert "'tf32' is not available on cpu" in message
    assert "compute capability" in message
    assert "available there: fp32, bf16, fp16, int8, fp8" in message
    assert precision_of(model) == "int8"


# --- numerics --------------------------------------------------------------------------------


def applied(layer: nn.Linear, name: str) -> nn.Module:
    """`layer` in a model converted by apply_precision: the path every model takes."""
    model = nn.Sequential(layer)
    apply_precision(model, name)
    return model


def measured_errors(case="bias") -> dict[str, float]:
    """Each precision's relative error on one of the check's layers (fp32 in and out), the same a
    registered precision is checked on."""
    return {
        name: checks.precision_error(lambda layer: applied(layer, name), checks.LAYER_CASES[case], "cpu", torch.float32)
        for name in CPU_PRECISIONS
    }


@pytest.mark.parametrize("case", checks.LAYER_CASES)
@pytest.mark.parametrize("name", CPU_PRECISIONS)
def test_each_precision_within_its_error_bound_of_float64(name, case):
    low, high = checks.ERROR_BOUNDS[name]
    error = measured_errors(case)[name]
    assert low <= error <= high, f"{name}: relative error {error:.2e} outside [{low:.1e}, {high:.1e}]"


def test_errors_order_as_the_formats_bits():
    errors = measured_errors()
    assert errors["fp32"] < errors["fp16"] < errors["bf16"] < errors["fp8"]
    assert errors["int8"] < errors["fp8"]
    assert errors["fp16"] * 4 < errors["bf16"]  # 3 more mantissa bits: about 8x less error


@pytest.mark.parametrize("name", CPU_PRECISIONS)
def test_output_comes_back_in_the_input_dtype(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    reference = model(x)
    apply_precision(model, name)
    y = model(x)
    assert y.dtype == torch.bfloat16
    assert checks.relative_error(y, reference) < 0.1


def test_int8_and_fp8_weights_are_a_quarter_of_fp32():
    model = small_mlp()
    weights = sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.Linear))
    for name in ("int8", "fp8"):
        report = apply_precision(model, name)
        assert report.bytes_before == weights
        # one scale per output channel: float32, but bf16 for int8 on the CPU (what its kernel reads)
        scales = (2 if name == "int8" else 4) * (128 + 128 + 64)
        assert report.bytes_after == weights // 4 + scales


# --- converting and restoring ----------------------------------------------------------------


def test_report_lists_exactly_the_linear_layers():
    model = small_mlp()
    report = apply_precision(model, "int8")
    assert report.precision == "int8"
    assert report.changed == ["0", "3.0", "4"]
    assert report.skipped == []
    assert "int8: 3 of 3 linear layers converted" in str(report)
    assert linear_names(model) == ["0.original", "3.0.original", "4.original"]  # only inside wrappers
    assert precision_of(model) == "int8"


def test_wrappers_keep_the_original_and_repr_in_one_line():
    model = small_mlp()
    originals = [model[0], model[3][0], model[4]]
    apply_precision(model, "int8")
    assert [model[0].original, model[3][0].original, model[4].original] == originals
    assert repr(model[0]) == "Int8Linear(in=64, out=128)"
    apply_precision(model, "bf16")
    assert repr(model[4]) == "CastLinear(in=128, out=64, precision=bf16)"
    apply_precision(model, "fp8")
    assert repr(model[3][0]) == "Fp8Linear(in=128, out=128)"
    assert model[0].weight is originals[0].weight  # libraries reading layer.weight see the original


@pytest.mark.parametrize("name", CPU_PRECISIONS)
def test_restore_gives_bit_identical_outputs(name):
    model = small_mlp()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    before = model(x)
    apply_precision(model, name)
    assert not torch.equal(model(x), before) or name == "fp32"
    assert restore_precision(model) == ["0", "3.0", "4"]
    assert torch.equal(model(x), before)
    assert precision_of(model) is None
    assert restore_precision(model) == []


def test_applying_twice_replaces_rather_than_stacks():
    model, fresh = small_mlp(), small_mlp()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    apply_precision(model, "int8")
    report = apply_precision(model, "bf16")
    apply_precision(fresh, "bf16")
    assert report.changed == ["0", "3.0", "4"]
    assert all(type(wrapper.original) is nn.Linear for wrapper in (model[0], model[3][0], model[4]))
    assert torch.equal(model(x), fresh(x))
    assert precision_of(model) == "bf16"


def test_skip_patterns_leave_layers_alone_and_say_why():
    model = small_mlp()
    report = apply_precision(model, "int8", skip=["0", "3.*"])
    assert report.changed == ["4"]
    assert report.skipped == [("0", "matches skip pattern '0'"), ("3.0", "matches skip pattern '3.*'")]
    assert type(model[0]) is nn.Linear and type(model[3][0]) is nn.Linear
    assert "skipped 3.0: matches skip pattern '3.*'" in str(report)


def test_skipping_a_converted_layer_gives_back_its_original():
    model = small_mlp()
    original = model[4]
    apply_precision(model, "int8")
    report = apply_precision(model, "bf16", skip=["4"])
    assert report.changed == ["0", "3.0"]
    assert model[4] is original


def test_fp8_skips_layers_whose_shapes_do_not_fit_scaled_mm():
    model = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 32), nn.Linear(32, 16))
    report = apply_precision(model, "fp8")
    assert report.changed == ["2"]
    assert [name for name, _ in report.skipped] == ["0", "1"]
    assert "divisible by 16" in report.skipped[0][1]
    model(torch.randn(2, 64))


class RecordMatmulMode(TorchFunctionMode):
    """Records torch.backends.cuda.matmul.fp32_precision at the moment of each F.linear."""

    def __init__(self):
        super().__init__()
        self.modes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.modes.append(torch.backends.cuda.matmul.fp32_precision)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, during", [("tf32", "tf32"), ("fp32", "ieee"), ("bf16", "tf32")])
def test_fp32_matmul_mode_is_set_only_during_the_layers_matmul(name, during):
    # tf32 cannot be applied on a CPU, but its wrapper can be built and run: the CUDA flag is
    # global state, harmless here, and what matters is that it is set and put back.
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    x = torch.randn(2, 16)
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32"  # as if the process had turned TF32 on for everything
    try:
        with RecordMatmulMode() as recorder:
            y = precision.CastLinear(layer, name)(x)
        assert recorder.modes == [during]  # bf16 does not touch the flag: no fp32 matmul to govern
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = previous
    if name != "bf16":
        assert torch.equal(y, layer(x))  # on a CPU tf32 computes plain fp32


# --- real models -----------------------------------------------------------------------------


def test_llama_runs_in_int8_with_its_tied_embedding_untouched():
    model = plain_llm("llama", tie_word_embeddings=True)
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding  # tied
    saved = embedding.detach().clone()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    all_linear = linear_names(model)
    with torch.no_grad():
        reference = model(ids).logits
        report = apply_precision(model, "int8")
        logits = model(ids).logits

    assert report.changed == all_linear
    assert len(report.changed) == 2 * 7 + 1  # q, k, v, o, gate, up, down per block, and lm_head
    assert 1e-4 < checks.relative_error(logits, reference) < LLAMA_INT8_LOGITS_ERROR
    assert model.lm_head.original.weight is model.model.embed_tokens.weight is embedding
    assert torch.equal(embedding, saved)

    restore_precision(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_unet_runs_within_tolerance(name):
    torch.manual_seed(0)
    model = tiny_unet()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    text = torch.randn(1, 4, 32, generator=generator)
    timestep = torch.tensor([10])
    all_linear = linear_names(model)
    with torch.no_grad():
        reference = model(sample, timestep, text).sample
        report = apply_precision(model, name)
        out = model(sample, timestep, text).sample
    assert report.changed == all_linear
    assert 1e-5 < checks.relative_error(out, reference) < UNET_ERROR[name]
    restore_precision(model)
    with torch.no_grad():
        assert torch.equal(model(sample, timestep, text).sample, reference)
