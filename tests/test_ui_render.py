"""What the app renders from the lanes' events, checked without a browser on tiny models."""

import math

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llm

from pipelines.remote import RemoteTextGeneration
from pipelines.text_generation import TextGenerationPipeline
from studio.profiling import ceilings_for
from studio.ui import render
from studio.ui.models import REMOTE, Models


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


def test_counters_say_what_ran_the_llm(events):
    text = render.llm_counters(events, ceilings_for("cpu"), torch.float32,
                               runtime=["fast path: fp32 weights; decode step compiled (3 s)", "2 CPU threads"])
    assert text.endswith("fast path: fp32 weights; decode step compiled (3 s)  \n2 CPU threads")


def test_runtime_lines_show_the_fast_paths_state_or_why_the_plain_loop_ran(tokenizer):
    from pipelines.fast_decode import FastDecoder
    from studio.ui import runtime_lines

    llm = TextGenerationPipeline(tiny_llm("llama"), tokenizer)
    llm.fast_decoder = FastDecoder(llm.model, compile="background")
    lines = runtime_lines(llm, fast=True)
    assert lines[0].startswith("fast path: ") and "compiles on first use" in lines[0]
    assert lines[1] == f"CPU threads: {torch.get_num_threads()} (torch.get_num_threads())"
    assert runtime_lines(llm, fast=False)[0].startswith("plain loop: the fast path does not run")
    llm.fast_path_error = "the fast path failed on cpu (boom)"
    assert runtime_lines(llm, fast=True)[0] == "plain loop: the fast path failed on cpu (boom)"
    assert runtime_lines(RemoteTextGeneration("http://127.0.0.1:9/v1", "m"), fast=None) == []


@pytest.mark.parametrize(
    "value, args, kwargs, message",
    [
        (float("nan"), ("seed", 0, 2**63 - 1), dict(whole=True), "seed must be a whole number from 0 to 2\\*\\*63 - 1; got NaN"),
        (None, ("steps", 1, 100), dict(whole=True), "got null"),
        ("8", ("max new tokens", 1, 256), dict(whole=True), 'got "8"'),
        (True, ("top-k", 0, 200), dict(whole=True), "got true"),
        (2.5, ("steps", 1, 100), dict(whole=True), "got 2.5"),
        (0.01, ("top-p", 0.05, 1), {}, "top-p must be a number from 0.05 to 1; got 0.01"),
    ],
)
def test_a_bad_number_is_refused_naming_the_field_and_its_range(value, args, kwargs, message):
    from studio.ui import inputs

    with pytest.raises(ValueError, match=message):
        inputs.number(value, *args, **kwargs)


def test_inputs_accept_what_the_browser_and_the_api_send():
    from studio.ui import inputs

    assert inputs.number(24.0, "max new tokens", 1, 256, whole=True) == 24
    assert inputs.number(None, "seed", 0, 10, whole=True, empty=0) == 0
    assert inputs.choice("32", "image size", ["model's own", "32"]) == inputs.choice(32, "image size", ["model's own", "32"]) == "32"
    assert inputs.text("a red apple 🍎", "prompt", 100) == "a red apple 🍎"
    with pytest.raises(ValueError, match="unpaired surrogate"):
        inputs.text("abc \ud800", "the prompt", 100)
    with pytest.raises(ValueError, match="must be true or false"):
        inputs.flag("yes", "KV cache")


def test_the_default_models_and_their_examples_come_from_the_manifest(tmp_path):
    import json

    from studio import assets
    from studio.ui import examples
    from studio.ui.models import allow_list

    assert assets.default_model("diffusion") == ("emoji-sd" if "emoji-sd" in assets.list_models() else "fashion-dit")
    assert examples(["fashion-dit"])[:2] == [["fashion-dit", "sneaker"], ["fashion-dit", "dress"]]
    assert allow_list("diffusion", {"diffusion": ["/data/my-sd"]})[0] == assets.default_model("diffusion")
    # shipping emoji-sd (adding it to the manifest) makes it the default, with no code change
    shipped = [m for m in json.loads(assets.MANIFEST.read_text())["models"] if m["name"] != "emoji-sd"]
    entry = dict(next(m for m in shipped if m["name"] == "fashion-dit"), name="emoji-sd", example_prompt="red apple",
                 example_prompts=["rocket", "dog face"])
    (tmp_path / "manifest.json").write_text(json.dumps({"models": shipped + [entry]}))
    assert assets.default_model("diffusion", tmp_path / "manifest.json") == "emoji-sd"
    assert assets.example_prompts("emoji-sd", tmp_path / "manifest.json") == ["red apple", "rocket", "dog face"]


def test_studio_models_extends_the_allow_list_per_lane(tmp_path):
    from studio import assets

    (tmp_path / "my-sd").mkdir()
    parsed = assets.operator_models(f" llm = HuggingFaceTB/SmolLM2-1.7B-Instruct ; diffusion=stabilityai/sd-turbo,"
                                    f"{tmp_path / 'my-sd'};")
    assert parsed == {"llm": ["HuggingFaceTB/SmolLM2-1.7B-Instruct"],
                      "diffusion": ["stabilityai/sd-turbo", str(tmp_path / "my-sd")]}
    assert assets.operator_models("") == {}
    with pytest.raises(ValueError, match="not lane=model"):
        assets.operator_models("stabilityai/sd-turbo")
    with pytest.raises(ValueError, match="lane of llm, diffusion"):
        assets.operator_models("image=stabilityai/sd-turbo")
    with pytest.raises(ValueError, match="folder .*missing does not exist"):
        assets.operator_models(f"llm={tmp_path / 'missing'}")


def test_the_filmstrip_writes_each_frame_once_under_its_own_name(tmp_path):
    """Gradio rewrote a PIL image's cache file on every update, and the browser, fetching it
    meanwhile, showed a broken thumbnail: each frame is now a file written once and never again."""
    from pathlib import Path

    from PIL import Image

    from studio.ui import Filmstrip

    strip = Filmstrip(tmp_path)
    first = strip.add(Image.new("L", (8, 8), 10), "step 1")
    written = Path(first[0][0]).stat().st_mtime_ns
    frames = strip.add(Image.new("L", (8, 8), 10), "step 2")  # the same picture gets a file of its own
    assert frames[0] == first[0] and frames[1][0] != frames[0][0] and frames[1][1] == "step 2"
    assert Path(first[0][0]).stat().st_mtime_ns == written
    assert Image.open(frames[1][0]).size == (128, 128)  # enlarged with square pixels for the thumbnail
    assert not list(strip.folder.glob("*.tmp"))


def token_steps(chosen: list[tuple[int, str]], adapter=None):
    """Generated-token events: each (id, text) chosen with probability 0.5, the top two listed."""
    from pipelines.generation import TokenStep

    return [TokenStep(phase="prefill" if i == 0 else "decode", index=i, token_id=token, text=text,
                      logprob=math.log(0.5), top=[(text, token, 0.5), ("other", 999, 0.2)], adapter=adapter)
            for i, (token, text) in enumerate(chosen)]


def test_the_comparison_finds_where_the_adapter_first_changes_the_chosen_token():
    without = token_steps([(1, " pizza"), (2, ":"), (3, " the"), (4, " end")])
    adapted = token_steps([(1, " pizza"), (2, ":"), (5, " cheese"), (6, ",")], adapter="emoji-describer")
    assert render.first_divergence(without, adapted) == 2
    assert render.first_divergence(without, without) is None
    assert render.first_divergence(without[:2], adapted) is None  # the first run has not got that far yet
    table = render.token_comparison(without, adapted, "emoji-describer", k=2)
    assert "they part at token 3" in table and "&#x27;&nbsp;the&#x27;" in table and "&#x27;&nbsp;cheese&#x27;" in table
    assert [row.split('"')[0] for row in table.split('<tr class="')[1:]] == ["same", "same", "diverge", "apart"]
    assert "top 2 without" in table and "<b>&#x27;&nbsp;pizza&#x27; 50%</b>" in table  # the other run's choice
    assert "the same 2 tokens so far" in render.token_comparison(without[:2], adapted[:2], "emoji-describer")


def test_the_pixel_difference_of_two_previews():
    from PIL import Image

    black, grey = Image.new("RGB", (4, 4)), Image.new("L", (4, 4), 51)
    assert render.pixel_difference(black, grey) == pytest.approx(51)
    assert render.pixel_difference(grey, grey) == 0


def test_counters_name_the_adapter_that_ran(events):
    import dataclasses

    adapted = [dataclasses.replace(ev, adapter="emoji-describer") for ev in events]
    assert "LoRA adapter **emoji-describer**" in render.llm_counters(adapted, ceilings_for("cpu"), torch.float32)
    assert "LoRA adapter" not in render.llm_counters(events, ceilings_for("cpu"), torch.float32)


def test_an_adapter_is_offered_only_with_its_base_model(tmp_path):
    import json

    from studio import assets
    from studio.ui.models import adapter_allow_list

    manifest = json.loads(assets.MANIFEST.read_text())
    shipped = [dict(manifest["models"][0], name="emoji-describer", kind="llm-adapter", base="smollm2-135m"),
               dict(manifest["models"][0], name="symbola-outline", kind="diffusion-adapter", base="emoji-sd")]
    (tmp_path / "manifest.json").write_text(json.dumps({"models": manifest["models"] + shipped}))
    extra = {"smollm2-135m": ["/data/my-lora"], "/data/my-llm": ["/data/other-lora"]}
    assert adapter_allow_list("llm", "smollm2-135m", extra, tmp_path / "manifest.json") == [
        "emoji-describer", "/data/my-lora"]
    assert adapter_allow_list("llm", "/data/my-llm", extra, tmp_path / "manifest.json") == ["/data/other-lora"]
    assert adapter_allow_list("diffusion", "emoji-sd", {}, tmp_path / "manifest.json") == ["symbola-outline"]
    assert adapter_allow_list("diffusion", "fashion-dit", extra, tmp_path / "manifest.json") == []


def test_studio_adapters_adds_adapter_folders_per_base_model(tmp_path):
    from studio import assets

    for name in ("lora-a", "lora-b"):
        (tmp_path / name).mkdir()
    parsed = assets.operator_adapters(f" smollm2-135m = {tmp_path / 'lora-a'} , {tmp_path / 'lora-b'} ; "
                                      f"emoji-sd={tmp_path / 'lora-a'};")
    assert parsed == {"smollm2-135m": [str(tmp_path / "lora-a"), str(tmp_path / "lora-b")],
                      "emoji-sd": [str(tmp_path / "lora-a")]}
    assert assets.operator_adapters("") == {}
    with pytest.raises(ValueError, match="is not base=folder"):
        assets.operator_adapters(str(tmp_path / "lora-a"))
    with pytest.raises(ValueError, match="adapter folder of smollm2-135m .*missing does not exist"):
        assets.operator_adapters(f"smollm2-135m={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="STUDIO_ADAPTERS: 'gpt2' is not one of this app's models"):
        Models(llm_names=["smollm2-135m"], diffusion_names=[], adapters={"gpt2": [str(tmp_path / "lora-a")]})


def test_each_measured_point_sits_at_or_under_the_roof_of_its_own_dtype():
    """This CPU's committed benchmark ran its points in fp32, and its bf16 ceiling was probed lower
    than its fp32 one: drawn against the bf16 roof, they sat above it (issue 16, item 11)."""
    import json
    from pathlib import Path

    import numpy as np

    from studio import inspector as config_inspector
    from studio.ui.inspector import roofline_figure

    bench = json.loads((Path(__file__).resolve().parent.parent / "docs/benchmarks/cpu-quick/bench.json").read_text())
    analysis = config_inspector.analyse("smollm2-135m")  # predicted in bf16: a second roof
    ax = roofline_figure(analysis, torch.device("cpu"), benchmark=bench).axes[0]
    roofs = {line.get_label().split()[1]: line for line in ax.get_lines() if line.get_label().startswith("roof: ")}
    assert set(roofs) == {"fp32", "bf16"}
    measured = [c for c in ax.collections if c.get_label().startswith("measured here: ")]
    assert len(measured) == len(bench["tables"]["side_by_side"]) >= 2
    for points in measured:
        dtype = points.get_label().rsplit(", ", 1)[1]
        (x, y), = points.get_offsets()
        roof_x, roof_y = roofs[dtype].get_data()
        roof = np.exp(np.interp(np.log(x), np.log(roof_x), np.log(roof_y)))
        assert y <= roof * 1.001, (points.get_label(), y, roof)
    predicted = [c for c in ax.collections if c.get_label().startswith("predicted: ")]
    assert predicted and all(c.get_label().endswith(", bf16") for c in predicted)
