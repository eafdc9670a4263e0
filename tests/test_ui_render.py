"""What the app renders from the lanes' events, checked without a browser on tiny models."""

import math

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llm

from pipelines.remote import RemoteTextGeneration
from pipelines.text_generation import TextGenerationPipeline
from studio.profiling import ceilings_for
from studio.ui import REMOTE, Models, render


@pytest.fixture(scope="module")
def events():
    llm = TextGenerationPipeline(tiny_llm("llama"), byte_tokenizer())
    return list(llm.stream("The cat sat", max_new_tokens=5))


def test_token_chips_show_each_prompt_token_with_its_id(events):
    html = render.token_chips(events[0].tokens, events[0].token_ids, byte_tokenizer())
    assert html.count('class="chip"') == len("The cat sat")
    assert "<sub>71</sub>" in html  # 'T' in the byte tokenizer


def test_token_stream_scores_each_token_by_its_probability(events):
    stream = render.token_stream(events)
    assert len(stream) == 5
    for (text, score), ev in zip(stream, events[1:]):
        assert score == pytest.approx(2 * math.exp(ev.logprob) - 1)


def test_alternatives_table_has_both_distributions(events):
    table = render.alternatives_table(events[2])
    assert set(table["distribution"]) == {"model", "sampled"}
    assert len(table) == 10 and table["token"][0].startswith("1. ")
    assert list(table["probability"][:5]) == sorted(table["probability"][:5], reverse=True)


def test_step_times_and_counters(events):
    times = render.step_times(events, ("prefill", "decode"))
    assert list(times["phase"]) == ["prefill"] + ["decode"] * 4
    assert list(render.step_times(events[:2], ("prefill", "decode"))["phase"]) == ["prefill", "decode"]
    assert list(times["step"]) == sorted(times["step"])  # the chart's alphabetical order is the run's
    text = render.llm_counters(events, ceilings_for("cpu"), torch.float32)
    assert "time to first token" in text and "tokens/s" in text and "memory-bound" in text


def test_timeline_places_each_stage_with_its_shapes(events):
    stages = render.stages(events, "llm")
    assert [s["phase"] for s in stages] == ["tokenize", "prefill", "decode"]
    assert stages[2]["count"] == 4
    html = render.timeline(stages, [])
    assert "decode ×4" in html and "logits (1, 1, 258)" in html


def test_a_remote_llm_is_offered_only_when_configured():
    remote = RemoteTextGeneration("http://127.0.0.1:9/v1", "m")
    models = Models(llm_names=["smollm2-135m"], diffusion_names=[], remote=remote)
    assert models.llm_names == ["smollm2-135m", REMOTE]
    assert models.llm(REMOTE, "cpu") is remote
    text = render.llm_counters([], None, None)
    assert "wall-clock" in text


def test_the_app_refuses_a_model_outside_its_allow_list():
    import gradio as gr

    with pytest.raises(gr.Error, match="not one of this app's llm models"):
        Models(llm_names=["smollm2-135m"], diffusion_names=[]).llm("/etc/passwd", "cpu")


def test_out_of_memory_becomes_a_message_naming_what_to_lower():
    import gradio as gr

    from studio.ui import request_errors

    with pytest.raises(gr.Error, match="lower max new tokens"):
        with request_errors("llm"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(gr.Error, match="lower the image size"):
        with request_errors("diffusion"):
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(gr.Error, match="prompt is empty"):
        with request_errors("llm"):
            raise ValueError("the prompt is empty; type some text to continue")
