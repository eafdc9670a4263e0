"""LoRA adapters in both lanes, against the stock libraries: peft's own model for the LLM lane,
diffusers' load_lora_weights for the diffusion lane; and every bad adapter a clear error that
leaves the base model loaded and working."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from serving import serving
from tiny_models import generate_image, save_peft_adapter, stock_sd, studio_pipeline, tiny_llm, tiny_sd_components

from pipelines.text_generation import TextGenerationPipeline
from studio.adapters import merged
from studio.loading import LoadError
from studio.server import create_api

PROMPT = "The cat sat on the mat. The cat sat"
# peft 0.21 (PeftModel, the reference these tests compare with) calls a transformers method that
# transformers 5.24 deprecates; the studio itself calls neither
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def llm(tokenizer):
    return TextGenerationPipeline(tiny_llm("llama"), tokenizer)


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    return save_peft_adapter(tmp_path_factory.mktemp("peft-lora"))


# ---------------------------------------------------------------------------------------------
# The LLM lane


@pytest.mark.parametrize("family, targets", [("llama", ("q_proj", "v_proj")), ("gpt2", ("c_attn", "c_fc"))])
def test_greedy_with_an_adapter_equals_peft_token_for_token(family, targets, tmp_path, tokenizer):
    llm = TextGenerationPipeline(tiny_llm(family), tokenizer)
    peft_folder = save_peft_adapter(tmp_path, family=family, targets=targets)
    name = llm.load_adapter(str(peft_folder), name="tiny")
    assert name == "tiny" and list(llm.adapters) == ["tiny"]
    ours = llm(PROMPT, max_new_tokens=16, adapter="tiny")
    reference = PeftModel.from_pretrained(tiny_llm(family), peft_folder).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = reference.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=llm.pad_token_id)
    assert ours.token_ids == expected[0, ids["input_ids"].shape[1]:].tolist()
    assert all(step.adapter == "tiny" for step in ours.steps[1:])


def test_the_adapter_switches_per_call_and_leaves_the_base_untouched(llm, peft_folder):
    base = llm(PROMPT, max_new_tokens=12, fast_path=False)
    llm.load_adapter(str(peft_folder), name="tiny")
    adapted = llm(PROMPT, max_new_tokens=12, adapter="tiny")
    assert adapted.token_ids != base.token_ids  # the adapter changes what the model writes
    again = llm(PROMPT, max_new_tokens=12, fast_path=False)
    assert again.token_ids == base.token_ids and all(step.adapter is None for step in again.steps)
    for layer in llm.adapters["tiny"].layers:  # nothing left behind on the layers it touched
        assert not llm.model.get_submodule(layer.module)._forward_hooks


def test_an_adapter_run_takes_the_plain_loop(llm, peft_folder):
    llm.load_adapter(str(peft_folder), name="tiny")
    with pytest.raises(ValueError, match="a LoRA adapter runs unmerged in the plain loop"):
        llm(PROMPT, max_new_tokens=2, adapter="tiny", fast_path=True)


def test_an_adapter_reports_its_parameters_against_the_base(llm, peft_folder):
    llm.load_adapter(str(peft_folder), name="tiny")
    adapter = llm.adapters["tiny"]
    rows = {row["target"]: row for row in adapter.by_target({"model": llm.model})}
    assert set(rows) == {"q_proj", "v_proj"}
    q = llm.model.model.layers[0].self_attn.q_proj
    assert rows["q_proj"]["parameters"] == 2 * 4 * (q.in_features + q.out_features)  # two layers, rank 4
    assert rows["q_proj"]["base_bytes"] == 2 * q.weight.nbytes
    assert adapter.parameters == sum(r["parameters"] for r in rows.values())


def bad_adapters(tmp_path, tokenizer):
    """(folder, message) pairs: each a way an adapter can be wrong."""
    missing = tmp_path / "nothing-here"
    damaged = save_peft_adapter(tmp_path / "damaged")
    (damaged / "adapter_model.safetensors").write_bytes(b"not safetensors")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04")
    other_arch = save_peft_adapter(tmp_path / "gpt2", family="gpt2", targets=("c_attn",))
    other_size = save_peft_adapter(tmp_path / "wide", hidden=128)
    diffusers_lora = tmp_path / "diffusers"
    diffusers_lora.mkdir()
    (diffusers_lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    broken_config = save_peft_adapter(tmp_path / "bad-config")
    (broken_config / "adapter_config.json").write_text("{not json")
    return [
        (missing, "no adapter at .*nothing-here"),
        (damaged, "adapter_model.safetensors is damaged"),
        (pickled, "only pickle weights"),
        (other_arch, "targets model.transformer.h.0.attn.c_attn|which this model does not have"),
        (other_size, "does not fit .*q_proj: its matrices are"),
        (diffusers_lora, "a diffusers LoRA \\(for the diffusion lane\\)"),
        (broken_config, "adapter_config.json is not readable JSON"),
    ]


def test_every_bad_adapter_is_a_clear_error_and_the_base_keeps_working(tmp_path, tokenizer):
    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    expected = llm(PROMPT, max_new_tokens=6, fast_path=False).token_ids
    for folder, message in bad_adapters(tmp_path, tokenizer):
        with pytest.raises(LoadError, match=message):
            llm.load_adapter(str(folder))
    assert llm.adapters == {}
    with pytest.raises(ValueError, match="no adapter named 'tiny' is loaded; loaded: none"):
        llm(PROMPT, max_new_tokens=2, adapter="tiny")
    assert llm(PROMPT, max_new_tokens=6, fast_path=False).token_ids == expected


# ---------------------------------------------------------------------------------------------
# The diffusion lane


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_an_image_with_an_adapter_equals_diffusers_load_lora_weights(lora_folder, scale):
    ours = studio_pipeline(tiny_sd_components())
    name = ours.load_adapter(str(lora_folder), name="style")
    got = generate_image(ours, adapter=name, adapter_scale=scale)
    stock = stock_sd(tiny_sd_components())
    stock.load_lora_weights(str(lora_folder))
    expected = stock(
        "a red apple", num_inference_steps=3, guidance_scale=5.0, output_type="np", height=got.image.height,
        width=got.image.width, generator=torch.Generator("cpu").manual_seed(0), cross_attention_kwargs={"scale": scale},
    ).images[0]
    np.testing.assert_allclose(got.pixels, expected, atol=1e-4)
    assert all(step.adapter == "style" for step in got.steps if step.phase in ("encode", "denoise"))


def test_the_diffusion_adapter_switches_per_call(lora_folder):
    pipe = studio_pipeline(tiny_sd_components())
    base = generate_image(pipe)
    pipe.load_adapter(str(lora_folder), name="style")
    adapted = generate_image(pipe, adapter="style")
    assert np.abs(adapted.pixels - base.pixels).max() > 1e-3
    np.testing.assert_array_equal(generate_image(pipe).pixels, base.pixels)
    with pytest.raises(ValueError, match="no adapter named 'other' is loaded; loaded: style"):
        generate_image(pipe, adapter="other")
    with pytest.raises(ValueError, match="adapter_scale must be a finite number"):
        generate_image(pipe, adapter="style", adapter_scale=float("nan"))


def test_a_peft_llm_adapter_is_refused_by_the_diffusion_lane(peft_folder):
    pipe = studio_pipeline(tiny_sd_components())
    with pytest.raises(LoadError, match="a peft adapter for a language model"):
        pipe.load_adapter(str(peft_folder))
    config = json.loads((peft_folder / "adapter_config.json").read_text())
    assert config["r"] == 4


def test_merged_weights_give_the_unmerged_image_and_are_restored_exactly(lora_folder):
    pipe = studio_pipeline(tiny_sd_components())
    name = pipe.load_adapter(str(lora_folder), name="style")
    unmerged = generate_image(pipe, adapter=name)
    before = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    with merged(pipe.adapter_components(), pipe.adapters[name]):
        folded = generate_image(pipe)
    np.testing.assert_allclose(folded.pixels, unmerged.pixels, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in pipe.denoiser.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Serving adapters, vLLM-style


def test_an_adapter_is_served_as_a_model_of_its_own(tokenizer, peft_folder):
    import openai

    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    api = create_api({"tiny": llm}, adapters={"tiny-lora": ("tiny", str(peft_folder))})
    with serving(api) as url:
        client = openai.OpenAI(base_url=url, api_key="not-needed", max_retries=0, timeout=60)
        cards = {card.id: card for card in client.models.list().data}
        assert set(cards) == {"tiny", "tiny-lora"} and cards["tiny-lora"].model_extra["parent"] == "tiny"
        adapted = client.completions.create(model="tiny-lora", prompt=PROMPT, max_tokens=8, temperature=0)
        base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
    assert adapted.choices[0].text == llm(PROMPT, max_new_tokens=8, adapter="tiny-lora").text
    assert base.choices[0].text == llm(PROMPT, max_new_tokens=8, fast_path=False).text != adapted.choices[0].text


def test_a_served_adapter_must_adapt_a_served_model(tokenizer, peft_folder):
    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    with pytest.raises(ValueError, match="adapts 'other', which is not served; served: tiny"):
        create_api({"tiny": llm}, adapters={"lora": ("other", str(peft_folder))})
    with pytest.raises(ValueError, match="'tiny' is already a served model's name"):
        create_api({"tiny": llm}, adapters={"tiny": ("tiny", str(peft_folder))})


def test_studio_inspect_reports_an_adapter_against_its_base(peft_folder, tmp_path, capsys):
    from studio.cli import main

    tiny_llm("llama").config.save_pretrained(tmp_path)
    assert main(["inspect", str(peft_folder), "--base", str(tmp_path / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "a LoRA adapter (rank 4)" in out
    q_row = next(line for line in out.splitlines() if "q_proj" in line).split()
    assert q_row[:3] == ["model", "q_proj", "2"]  # two layers, with 2 x 4 x (64 + 64) parameters
    assert " ".join(q_row[3:5]) == "1.02 k" and q_row[-1] == "12.5%"
    assert main(["inspect", str(peft_folder)]) == 2  # a folder does not name its base
    assert "does not say which model it adapts: pass the base model (--base)" in capsys.readouterr().err
