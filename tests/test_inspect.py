"""The inspector: what a config.json predicts, checked exactly against real tiny models and the lanes' events."""

import pytest
import torch
from tiny_models import LLM_FAMILIES, byte_tokenizer, tiny_dit, tiny_llm, tiny_pixart, tiny_unet
from transformers import DynamicCache

from pipelines.text_generation import TextGenerationPipeline
from studio import backends, inspector
from studio.cli import main
from studio.cost import decoder_step_cost
from studio.profiling import count_flops, known_devices

PROMPT = "The cat sat on the mat."


@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_llm_parameters_and_bytes_equal_a_real_tiny_model(family, dtype):
    model = tiny_llm(family).to(inspector.TORCH_DTYPES[dtype])
    analysis = inspector.analyse(model.config.to_dict(), dtype=dtype)
    assert analysis.parameters == model.num_parameters()
    assert analysis.weight_bytes[dtype] == sum(p.numel() * p.element_size() for p in model.parameters())


DENOISERS = {
    "unet": lambda: tiny_unet(layers_per_block=1, sample_size=8),
    "dit": lambda: tiny_dit(sample_size=8, patch_size=2, head_dim=16, classes=10),
    "pixart": tiny_pixart,
}


@pytest.mark.parametrize("make", list(DENOISERS.values()), ids=list(DENOISERS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_denoiser_parameters_and_bytes_equal_a_real_tiny_model(make, dtype):
    model = make().to(inspector.TORCH_DTYPES[dtype])
    config = {"_class_name": type(model).__name__, **dict(model.config)}
    analysis = inspector.analyse(config, dtype=dtype)
    assert analysis.kind == "diffusion"
    assert analysis.parameters == model.num_parameters()
    assert analysis.weight_bytes[dtype] == sum(p.numel() * p.element_size() for p in model.parameters())
    assert analysis.workload("denoise step").flops > 0


@pytest.mark.parametrize("name, parameters", [
    ("smollm2-135m", 134_515_008), ("llama-3.2-1b", 1_235_814_400), ("llama-3.1-8b", 8_030_261_248),
    ("qwen2.5-0.5b", 494_032_768), ("gpt2", 124_439_808),
])
def test_reference_llm_configs_have_the_published_parameter_counts(name, parameters):
    config = inspector.load_config(name).config
    assert inspector.llm_on_meta(config).num_parameters() == parameters


def test_reference_unet_config_has_the_published_parameter_count():
    config = inspector.load_config("sd-1.5-unet").config
    assert inspector.diffusers_on_meta(config).num_parameters() == 859_520_964


def test_reference_names_are_forgiving():
    for spelling, name in [("Llama-3.2-1B", "llama-3.2-1b"), ("DiT-XL/2", "dit-xl-2-256"), ("SD-1.5 UNet", "sd-1.5-unet"),
                           ("SmolLM2-135M", "smollm2-135m")]:
        assert inspector.find_reference(spelling).name == name
    assert "tiny-llama" not in inspector.reference_configs()
    assert "tiny-llama" in inspector.reference_configs(tiny=True)


@pytest.fixture(scope="module")
def llm():
    return TextGenerationPipeline(tiny_llm("llama"), byte_tokenizer())


def test_kv_bytes_per_token_equal_what_the_lane_allocates(llm):
    analysis = inspector.analyse(llm.model.config.to_dict(), dtype="fp32")
    events = list(llm.stream(PROMPT, max_new_tokens=8, fast_path=False))  # the dynamic cache grows per token
    prompt_len, generated = len(events[0].token_ids), len(events) - 1
    # after the last step the cache holds the prompt and every generated token but the last
    assert events[-1].kv_cache_bytes == analysis.kv_bytes_per_token * (prompt_len + generated - 1)
    assert analysis.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 KV heads x 16 dims x fp32


def test_prefill_and_decode_work_equal_the_lane_events(llm):
    events = list(llm.stream(PROMPT, max_new_tokens=3))
    prompt_len = len(events[0].token_ids)
    analysis = inspector.analyse(llm.model.config.to_dict(), dtype="fp32", prompt_tokens=prompt_len)
    prefill, first_decode = events[1], events[2]
    assert (prefill.flops, prefill.bytes) == (analysis.workload("prefill").flops, analysis.workload("prefill").bytes)
    assert (first_decode.flops, first_decode.bytes) == (analysis.workload("decode").flops, analysis.workload("decode").bytes)


def test_the_cost_model_counts_what_flop_counter_mode_sees(llm):
    """decoder_step_cost against torch's FlopCounterMode on real forward passes (eager attention,
    whose matmuls the counter sees): a decode step exactly; a prefill's weight matmuls exactly, and
    its attention as the full score matrix the kernel computes, of which the causal part is the
    model's work and what the cost model counts."""
    model, shape = llm.model, llm.shape
    ids = torch.tensor([llm.tokenizer(PROMPT)["input_ids"]])
    length = ids.shape[1]
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), backends.use(attention="eager"):
        _, prefill = count_flops(lambda: model(input_ids=ids, **{llm.cache_keyword: cache}, logits_to_keep=1))
        _, decode = count_flops(lambda: model(input_ids=ids[:, -1:], **{llm.cache_keyword: cache}, logits_to_keep=1))
    assert decode == decoder_step_cost(shape, 1, 1, length + 1)[0]
    per_pair = 4 * shape.layers * shape.heads * shape.head_dim  # Q·Kᵀ and P·V, per query-key pair
    causal = per_pair * length * (length + 1) // 2
    assert prefill - per_pair * length * length == decoder_step_cost(shape, 1, length, length)[0] - causal


def test_every_known_device_gets_a_prediction_and_the_bounds_follow_the_roofline():
    analysis = inspector.analyse("llama-3.2-1b", prompt_tokens=2048)
    assert analysis.devices == known_devices()
    for device in analysis.devices:
        assert analysis.predicted(device, "decode").bound == "memory"
    h100 = analysis.predicted("H100 SXM", "decode")
    # decode reads every weight once: 2.47 GB of bf16 at 3.35 TB/s
    assert h100.ms == pytest.approx(analysis.workload("decode").bytes / 3.35e12 * 1e3)
    assert analysis.predicted("H100 SXM", "prefill").bound == "compute"
    assert inspector.analyse("llama-3.2-1b", device="h100").devices == ["H100 SXM", "H100 PCIe"]


def test_inspect_prints_parameters_kv_bytes_and_a_bound_per_known_device(capsys):
    assert main(["inspect", "tiny-llama", "--results", "/nonexistent.json"]) == 2  # a named results file must exist
    capsys.readouterr()
    assert main(["inspect", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "107,072" in out
    assert "bytes/token" in out
    for device in known_devices():
        assert device in out
    assert "memory" in out  # decode is memory-bound everywhere


def test_inspect_analyses_a_diffusion_pipeline_folder(capsys):
    assert main(["inspect", "tiny-sd", "--device", "h100"]) == 0
    out = capsys.readouterr().out
    assert "UNet2DConditionModel" in out and "denoise step" in out and "vae decode" in out
    assert "H100 SXM" in out and "A100" not in out


def test_an_unknown_config_is_a_clear_error(capsys):
    assert main(["inspect", "no-such-model"]) == 2
    assert "reference config" in capsys.readouterr().err
