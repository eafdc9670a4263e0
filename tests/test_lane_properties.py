"""Each lane's argument checking, for any value of any argument (hypothesis): a clear ValueError
naming the argument, or a run that finishes; never another exception, never a hang, and the
pipeline usable after."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import SIZE, studio_pipeline, tiny_llm, tiny_sd_components

from pipelines.text_generation import TextGenerationPipeline

# the values JSON and a careless caller send: wrong types, edges, NaN, huge numbers, lone surrogates
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["\ud800", "", " ", "euler", "batched", "linear", 0, 1, 2, -1, 0.5, 1e308]),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LLM_ARGUMENTS = ["max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                 "top_logprobs", "stop", "use_cache", "chat", "speculative", "num_draft_tokens", "fast_path", "adapter"]
DIFFUSION_ARGUMENTS = ["negative_prompt", "steps", "guidance_scale", "seed", "height", "width", "scheduler", "cfg_mode",
                       "strength", "preview", "vae_preview_every", "adapter", "adapter_scale"]


@pytest.fixture(scope="module")
def llm(tokenizer):
    return TextGenerationPipeline(tiny_llm("llama"), tokenizer)


@pytest.fixture(scope="module")
def img():
    return studio_pipeline(tiny_sd_components())


def finishes_or_says_what(run, argument: str):
    try:
        run()
    except ValueError as error:  # BackendError and LoadError are ValueErrors too
        assert str(error).strip(), f"an empty message for {argument}"


@PROPERTY
@given(argument=st.sampled_from(LLM_ARGUMENTS), value=ANY, prompt=st.one_of(st.just("The cat sat"), ANY))
def test_any_value_of_any_llm_argument_is_a_run_or_a_clear_error(llm, argument, value, prompt):
    options = {"max_new_tokens": 3, argument: value}
    if argument == "max_new_tokens" and isinstance(value, int) and not isinstance(value, bool) and value > 8:
        options[argument] = 8  # a valid large count: a long run proves nothing more
    finishes_or_says_what(lambda: llm(prompt, **options), argument)
    assert llm("The cat sat", max_new_tokens=2, fast_path=False).finish_reason in ("length", "eos")


@PROPERTY
@given(argument=st.sampled_from(DIFFUSION_ARGUMENTS), value=ANY, prompt=st.one_of(st.just("a red apple"), ANY))
def test_any_value_of_any_diffusion_argument_is_a_run_or_a_clear_error(img, argument, value, prompt):
    options = {"steps": 2, "height": SIZE, "width": SIZE, argument: value}
    if argument == "steps" and isinstance(value, int) and not isinstance(value, bool) and value > 4:
        options[argument] = 4
    if argument in ("height", "width") and isinstance(value, int) and not isinstance(value, bool) and value > 64:
        options[argument] = 64  # valid but large images prove nothing more
    if argument == "vae_preview_every" and isinstance(value, int) and value > 2:
        options[argument] = 2
    finishes_or_says_what(lambda: img(prompt, **options), argument)
    result = img("a red apple", steps=2, height=SIZE, width=SIZE)
    assert math.isfinite(float(torch.as_tensor(result.pixels).sum()))
