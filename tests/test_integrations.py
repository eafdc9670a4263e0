"""The backends plugged into stock transformers and diffusers models give the libraries' own results."""

import pytest
import torch
from tiny_models import LLM_FAMILIES, plain_llm, tiny_dit, tiny_pixart, tiny_t5_encoder, tiny_unet, tiny_vae

from studio import backends
from studio.integrations import diffusers as studio_diffusers
from studio.integrations import transformers as studio_transformers

CPU = torch.device("cpu")
# flex compiles per shape and a decode loop changes shape every step: covered in the kernel tests
BACKENDS = [
    b.name for b in backends.available(CPU, torch.float32) if b.kind == "attention" and b.available and b.name != "flex"
]


def greedy(model, input_ids, attention_mask):
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )


@pytest.fixture(scope="module", params=LLM_FAMILIES)
def llm_and_expected(request):
    model = plain_llm(request.param)  # seeded: the prompts below draw from the generator after it
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
    model = plain_llm("llama")
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
    torch.manual_seed(0)
    model = tiny_t5_encoder(vocab=100, buckets=32)
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
    model = plain_llm("llama")
    studio_transformers.use_studio_attention(model)
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        full = model(ids, attention_mask=torch.ones_like(ids)).logits
        padded = model(ids, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]])).logits
    assert not torch.allclose(full[0, -1], padded[0, -1], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# diffusers models, built tiny as diffusers' own tests build them


def unet_inputs():
    return dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor(10), encoder_hidden_states=torch.randn(2, 7, 32))


def dit_inputs():
    return dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 3]), class_labels=torch.tensor([1, 9]))


def pixart_inputs():
    return dict(
        hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([5, 5]),
        encoder_hidden_states=torch.randn(2, 6, 32), encoder_attention_mask=torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def vae_inputs():
    return dict(sample=torch.randn(1, 3, 16, 16))


DENOISERS = {
    "unet": (lambda: tiny_unet(sample_size=16), unet_inputs),
    "dit": (lambda: tiny_dit(sample_size=8, patch_size=2, head_dim=16, classes=10), dit_inputs),
    "pixart": (tiny_pixart, pixart_inputs),
    "vae": (tiny_vae, vae_inputs),
}


@pytest.fixture(scope="module", params=list(DENOISERS))
def diffusers_model_and_expected(request):
    build, make_inputs = DENOISERS[request.param]
    torch.manual_seed(0)
    model = build()
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
    model = tiny_unet(sample_size=16)
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
