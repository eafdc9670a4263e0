"""The backends plugged into stock transformers and diffusers models give the libraries' own results."""

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DConditionModel
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from studio import backends
from studio.integrations import diffusers as studio_diffusers
from studio.integrations import transformers as studio_transformers

CPU = torch.device("cpu")
# flex compiles per shape and a decode loop changes shape every step: covered in the kernel tests
BACKENDS = [
    b.name for b in backends.available(CPU, torch.float32) if b.kind == "attention" and b.available and b.name != "flex"
]

LLMS = {
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    ),
}


def greedy(model, input_ids, attention_mask):
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )


@pytest.fixture(scope="module", params=list(LLMS))
def llm_and_expected(request):
    torch.manual_seed(0)
    model = LLMS[request.param]().eval()
    model.set_attn_implementation("eager")  # the library's own textbook attention: the reference
    prompts = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(prompts)
    prompts[1, :4] = 0  # left padding: the second prompt is 5 tokens long
    mask[1, :4] = 0
    with torch.no_grad():
        expected = greedy(model, prompts, mask)
        single = greedy(model, prompts[1:, 4:], mask[1:, 4:])
    # padding must not change what the padded prompt produces
    assert torch.equal(expected[1, 9:], single[0, 5:])
    studio_transformers.use_studio_attention(model)
    return model, prompts, mask, expected


@pytest.mark.parametrize("name", BACKENDS)
def test_greedy_generate_is_unchanged_by_each_backend(llm_and_expected, name):
    model, prompts, mask, expected = llm_and_expected
    assert model.config._attn_implementation == "studio"
    with torch.no_grad(), backends.use(attention=name):
        got = greedy(model, prompts, mask)
    assert torch.equal(got, expected)


def test_a_loaded_model_switches_backend_without_reloading():
    torch.manual_seed(0)
    model = LLMS["llama"]().eval()
    studio_transformers.use_studio_attention(model)
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        with backends.use(attention="eager"):
            eager = model(ids, output_attentions=True)
        with backends.use(attention="tiled"):
            tiled = model(ids)
    torch.testing.assert_close(eager.logits, tiled.logits, atol=1e-5, rtol=1e-5)
    # the eager kernel hands its weights to transformers, so attention maps can be drawn
    assert eager.attentions[0].shape == (1, 4, 6, 6)


def test_t5_position_bias_reaches_the_backend():
    """T5 adds a learned relative-position bias to its scores; dropping it changes the embeddings."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        studio_transformers.use_studio_attention(model)
        for name in BACKENDS:
            with backends.use(attention=name):
                got = model(ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1, :4], expected[1, :4], atol=1e-5, rtol=1e-5)


def test_padding_mask_reaches_the_backend():
    """Without the mask registration transformers would build no mask and padding would leak."""
    torch.manual_seed(0)
    model = LLMS["llama"]().eval()
    studio_transformers.use_studio_attention(model)
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        full = model(ids, attention_mask=torch.ones_like(ids)).logits
        padded = model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]])).logits
    assert not torch.allclose(full[0, -1], padded[0, -1], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# diffusers models, built tiny as diffusers' own tests build them


def tiny_unet():
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    )


def unet_inputs():
    return dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor(10), encoder_hidden_states=torch.randn(2, 7, 32))


def tiny_dit():
    return DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=2,
        attention_head_dim=16, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )


def dit_inputs():
    return dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 3]), class_labels=torch.tensor([1, 9]))


def tiny_pixart():
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )


def pixart_inputs():
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([5, 5]),
        encoder_hidden_states=torch.randn(2, 6, 32), encoder_attention_mask=torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def tiny_vae():
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def vae_inputs():
    return dict(sample=torch.randn(1, 3, 16, 16))


DENOISERS = {
    "unet": (tiny_unet, unet_inputs),
    "dit": (tiny_dit, dit_inputs),
    "pixart": (tiny_pixart, pixart_inputs),
    "vae": (tiny_vae, vae_inputs),
}


@pytest.fixture(scope="module", params=list(DENOISERS))
def diffusers_model_and_expected(request):
    build, make_inputs = DENOISERS[request.param]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs()
    with torch.no_grad():
        expected = model(**inputs).sample
    count = studio_diffusers.use_studio_attention(model)
    assert count >= 1
    return model, inputs, expected


@pytest.mark.parametrize("name", BACKENDS)
def test_diffusers_output_is_unchanged_by_each_backend(diffusers_model_and_expected, name):
    model, inputs, expected = diffusers_model_and_expected
    with torch.no_grad(), backends.use(attention=name):
        got = model(**inputs).sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fused_qkv_projections_give_the_same_unet_output():
    torch.manual_seed(0)
    model = tiny_unet().eval()
    inputs = unet_inputs()
    with torch.no_grad():
        expected = model(**inputs).sample
        model.fuse_qkv_projections()
        studio_diffusers.use_studio_attention(model)  # after fusing: fusing installs its own processors
        got = model(**inputs).sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_a_model_without_attention_is_refused():
    with pytest.raises(backends.BackendError, match="no diffusers Attention modules"):
        studio_diffusers.use_studio_attention(torch.nn.Linear(2, 2))
