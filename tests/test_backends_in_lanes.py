"""Every attention backend `backends.available()` calls available drives every component of both
lanes: the LLM families, and the diffusion families' denoisers, VAEs and text encoders (CLIP, T5),
which run under the diffusion lane's FLOP counter on their first call."""

import numpy as np
import pytest
import torch
from tiny_models import (
    LLM_FAMILIES,
    generate_image,
    studio_pipeline,
    tiny_dit_components,
    tiny_llm,
    tiny_pixart_components,
    tiny_sd_components,
)

from pipelines.text_generation import TextGenerationPipeline
from studio import backends

AVAILABLE = [b.name for b in backends.available("cpu") if b.kind == "attention" and b.available]
DIFFUSION_FAMILIES = {"sd": tiny_sd_components, "dit": tiny_dit_components, "pixart": tiny_pixart_components}


@pytest.fixture(scope="module")
def llms(tokenizer):
    return {family: TextGenerationPipeline(tiny_llm(family), tokenizer) for family in LLM_FAMILIES}


@pytest.fixture(scope="module")
def diffusion():
    return {name: studio_pipeline(build()) for name, build in DIFFUSION_FAMILIES.items()}


@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("kernel", AVAILABLE)
def test_each_available_kernel_drives_the_llm_lane(llms, family, kernel):
    llm = llms[family]
    expected = llm("The cat sat", max_new_tokens=4, fast_path=False).token_ids
    with backends.use(attention=kernel):
        for fast_path in (False, None):  # the plain loop, and the fast path where the model has one
            assert llm("The cat sat", max_new_tokens=4, fast_path=fast_path).token_ids[:1] == expected[:1]


@pytest.mark.parametrize("family", DIFFUSION_FAMILIES)
@pytest.mark.parametrize("kernel", AVAILABLE)
def test_each_available_kernel_drives_every_diffusion_component(diffusion, family, kernel):
    pipe = diffusion[family]
    prompt = "" if family == "dit" else "a red apple"  # DiT takes class names; "" is its null class
    expected = generate_image(pipe, prompt, steps=2)
    with backends.use(attention=kernel):
        result = generate_image(pipe, prompt, steps=2)
    assert all(step.flops is None or step.flops >= 0 for step in result.steps)
    np.testing.assert_allclose(result.pixels, expected.pixels, atol=2e-3)
    assert not torch.isnan(torch.from_numpy(result.pixels)).any()
