"""The diffusion lane: our loop gives the stock diffusers pipelines' images, and shows its work.

Tiny random models (tests/tiny_models.py), built as diffusers' own tests build them; the
tokenizers are built in code, so nothing is downloaded.
"""

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DiTPipeline,
    EulerDiscreteScheduler,
    PixArtAlphaPipeline,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from PIL import Image
from tiny_models import (
    SIZE,
    generate_image,
    sd_scheduler,
    stock_sd,
    studio_pipeline,
    tiny_dit_components,
    tiny_pixart_components,
    tiny_sd_components,
    tiny_vae,
)

from pipelines import LatentDiffusionPipeline
from pipelines.latent_diffusion import SCHEDULERS, predicted_x0
from pipelines.previews import (
    SD15_FACTORS,
    SDXL_FACTORS,
    LatentRGBFactors,
    fit_latent_rgb_factors,
    known_factors,
    latents_to_preview,
)
from studio import backends
from studio.integrations.diffusers import StudioAttnProcessor
from studio.loading import LoadError


@pytest.fixture(scope="module")
def sd_parts():
    return tiny_sd_components()


@pytest.fixture(scope="module")
def sd(sd_parts):
    return studio_pipeline(sd_parts)


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    parts = tiny_sd_components()
    stock_sd(parts).save_pretrained(folder, safe_serialization=True)
    return folder, parts


def denoiser_counter(model):
    """Counts the denoiser's real calls and the batch rows they computed, seen from a forward hook."""
    seen = {"calls": 0, "rows": 0}

    def hook(module, args, output):
        seen["calls"] += 1
        seen["rows"] += args[0].shape[0]

    return seen, model.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------
# The same images as the stock pipelines


def test_matches_stock_stable_diffusion_pipeline(sd_parts, sd):
    expected = stock_sd(sd_parts)(
        "a red apple", num_inference_steps=3, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    got = generate_image(sd)
    assert got.pixels.shape == (SIZE, SIZE, 3)
    assert expected.std() > 0.05  # a real picture to compare, not a flat one
    np.testing.assert_allclose(got.pixels, expected, atol=1e-4)
    assert np.array_equal(np.asarray(got.image), np.round(got.pixels * 255).astype(np.uint8))


def test_img2img_matches_stock_img2img_pipeline(sd_parts, sd):
    rng = np.random.default_rng(0)
    start = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    stock = StableDiffusionImg2ImgPipeline(
        **sd_parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    stock.set_progress_bar_config(disable=True)
    expected = stock(
        "a red apple", image=start, strength=0.6, num_inference_steps=5, guidance_scale=5.0, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    got = sd("a red apple", image=start, strength=0.6, steps=5, guidance_scale=5.0, seed=0)
    np.testing.assert_allclose(got.pixels, expected, atol=1e-4)
    encoded = [s for s in got.steps if s.phase == "encode"]
    assert [s.index for s in encoded] == [0, 1]
    assert encoded[1].shapes == {"input_image": (1, 3, SIZE, SIZE), "image_latents": (1, 4, 16, 16)}
    assert encoded[1].flops > 0 and "vae" in encoded[1].parts
    assert sum(s.phase == "denoise" for s in got.steps) == 3  # int(5 steps x 0.6 strength)


@pytest.fixture(scope="module")
def dit_stock():
    id2label = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark"}
    pipe = DiTPipeline(**tiny_dit_components(), id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_matches_stock_dit_pipeline_with_class_names_as_prompts(dit_stock):
    expected = dit_stock(
        class_labels=[1], guidance_scale=4.0, num_inference_steps=3, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0),
    ).images[0]
    pipe = LatentDiffusionPipeline(
        dit_stock.transformer, dit_stock.vae, dit_stock.scheduler, class_ids=dit_stock.labels
    )
    got = pipe("Goldfish", steps=3, guidance_scale=4.0, seed=0)
    np.testing.assert_allclose(got.pixels, expected, atol=1e-4)
    assert got.steps[0].shapes == {"class_labels": (2,)}
    assert pipe.class_id("carassius auratus") == 1 and pipe.class_id("") == 1000  # "" is the null class
    with pytest.raises(ValueError, match="did you mean 'goldfish'"):
        pipe("goldfsh", steps=2)
    assert pipe("", steps=2).pixels.shape == (SIZE, SIZE, 3)  # unconditional


def test_matches_stock_pixart_pipeline():
    parts = tiny_pixart_components()
    stock = PixArtAlphaPipeline(**parts)
    stock.set_progress_bar_config(disable=True)
    # PixArt lower-cases prompts (clean_caption=False still does): a lower-case prompt is the same text
    expected = stock(
        "a red apple", negative_prompt="", num_inference_steps=3, guidance_scale=4.5, output_type="np",
        generator=torch.Generator("cpu").manual_seed(0), use_resolution_binning=False, clean_caption=False,
    ).images[0]
    got = studio_pipeline(parts)("a red apple", steps=3, guidance_scale=4.5, seed=0)
    np.testing.assert_allclose(got.pixels, expected, atol=1e-4)
    assert got.steps[0].shapes["text_embeddings"] == (2, 120, 32)  # PixArt-alpha's 120 prompt tokens


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance, counted


def test_batched_and_sequential_cfg_agree(sd):
    for mode in ("batched", "sequential"):  # FLOPs are counted on one extra call per new shape: done here
        generate_image(sd, cfg_mode=mode)
    seen, hook = denoiser_counter(sd.denoiser)
    try:
        batched = generate_image(sd, cfg_mode="batched")
        batched_calls = dict(seen)
        sequential = generate_image(sd, cfg_mode="sequential")
    finally:
        hook.remove()
    np.testing.assert_allclose(sequential.pixels, batched.pixels, atol=1e-5)
    assert batched_calls == {"calls": 3, "rows": 6}  # one call of a batch of two per step
    assert seen == {"calls": 3 + 6, "rows": 6 + 6}  # sequential: two calls of one per step
    assert batched.forward_passes == sequential.forward_passes == 6

    batched_steps = [s for s in batched.steps if s.phase == "denoise"]
    sequential_steps = [s for s in sequential.steps if s.phase == "denoise"]
    assert [s.denoiser_calls for s in batched_steps] == [1, 1, 1]
    assert [s.denoiser_calls for s in sequential_steps] == [2, 2, 2]
    assert batched_steps[0].shapes["denoiser_input"] == (2, 4, 16, 16)
    assert sequential_steps[0].shapes["denoiser_input"] == (1, 4, 16, 16)
    # the same arithmetic either way; batching reads the denoiser's weights once instead of twice
    for b, s in zip(batched_steps, sequential_steps):
        # equal but for the attention kernel probe `auto` runs once, inside whichever count comes first
        assert b.flops == pytest.approx(s.flops, rel=1e-4) and b.flops > 0
        assert s.bytes - b.bytes == sd.weight_bytes["denoiser"]


def test_fifty_steps_with_cfg_are_a_hundred_forward_passes(sd):
    sd("a red apple", steps=1, guidance_scale=7.5, height=8, width=8, preview=None)  # the FLOP count's extra call
    seen, hook = denoiser_counter(sd.denoiser)
    try:
        result = sd("a red apple", steps=50, guidance_scale=7.5, height=8, width=8, preview=None)
    finally:
        hook.remove()
    denoised = [s for s in result.steps if s.phase == "denoise"]
    assert [s.forward_passes for s in denoised] == list(range(2, 101, 2))
    assert result.forward_passes == 100 == seen["rows"]


def test_guidance_one_makes_one_pass_per_step(sd):
    seen, hook = denoiser_counter(sd.denoiser)
    try:
        result = generate_image(sd, guidance_scale=1.0)
    finally:
        hook.remove()
    assert seen == {"calls": 3, "rows": 3}
    assert [s.passes for s in result.steps if s.phase == "denoise"] == [1, 1, 1]
    assert result.forward_passes == 3
    assert result.steps[0].shapes["text_embeddings"] == (1, 77, 32)  # no negative prompt encoded


def test_empty_prompt_is_allowed(sd):
    result = generate_image(sd, prompt="")
    assert np.isfinite(result.pixels).all()


# ---------------------------------------------------------------------------------------------
# Every step observable


def test_every_step_reports_timestep_sigma_time_work_and_shapes(sd):
    result = generate_image(sd, scheduler="euler")
    assert [s.phase for s in result.steps] == ["encode", "denoise", "denoise", "denoise", "decode"]
    encode, *denoised, decode = result.steps
    assert encode.shapes == {"token_ids": (2, 77), "text_embeddings": (2, 77, 32)}
    assert encode.flops > 0 and encode.shares["text_encoder"] > 0  # shares are times: their size is for the bench

    schedule = EulerDiscreteScheduler.from_config(sd.scheduler.config)
    schedule.set_timesteps(3)
    assert [s.timestep for s in denoised] == [float(t) for t in schedule.timesteps]
    np.testing.assert_allclose([s.sigma for s in denoised], schedule.sigmas[:3].numpy(), rtol=1e-5)
    assert [s.warmup for s in denoised] == [True, False, False]
    assert [s.index for s in denoised] == [0, 1, 2] and all(s.total == 3 for s in denoised)
    for step in denoised:
        assert step.ms > 0 and step.flops > 0 and step.bytes > sd.weight_bytes["denoiser"]
        assert step.shapes == {
            "latents": (1, 4, 16, 16), "denoiser_input": (2, 4, 16, 16), "text_embeddings": (2, 77, 32),
            "noise_pred": (1, 4, 16, 16),
        }
        assert set(step.shares) == {"text_encoder", "denoiser", "vae", "other"}
        assert step.shares["denoiser"] > 0 and sum(step.shares.values()) == pytest.approx(1.0)
    assert len({s.flops for s in denoised}) == 1  # counted once per shape, then reused

    assert decode.shapes == {"latents": (1, 4, 16, 16), "image": (1, 3, SIZE, SIZE)}
    assert decode.flops > 0 and decode.shares["vae"] > 0 and decode.image.size == (SIZE, SIZE)
    assert sum(result.shares.values()) == pytest.approx(1.0)
    assert result.ms == pytest.approx(sum(s.ms for s in result.steps))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs(sd, name):
    result = generate_image(sd, scheduler=name)
    denoised = [s for s in result.steps if s.phase == "denoise"]
    assert np.isfinite(result.pixels).all() and result.pixels.std() > 0
    assert len(denoised) == result.steps[-1].total >= 3
    assert result.forward_passes == 2 * len(denoised)
    assert all(s.preview is not None and s.sigma > 0 for s in denoised[:-1])


def test_x0_formula_matches_the_scheduler_that_reports_it():
    """The x0 previews of DPM-Solver and PNDM come from predicted_x0; DDIM reports its own."""
    schedule = sd_scheduler()
    schedule.set_timesteps(10)
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = schedule.timesteps[3]
    reported = schedule.step(noise, t, latents).pred_original_sample
    torch.testing.assert_close(predicted_x0(schedule, noise, latents, t), reported)


def test_previews_do_not_change_the_final_image(sd):
    # euler-ancestral draws fresh noise every step: a preview that touched the generator would show
    plain = generate_image(sd, scheduler="euler-ancestral", preview=None)
    previewed = generate_image(sd, scheduler="euler-ancestral", preview="linear", vae_preview_every=2)
    assert np.array_equal(plain.pixels, previewed.pixels)
    kinds = [s.preview_kind for s in previewed.steps if s.phase == "denoise"]
    assert kinds == ["linear", "vae", "linear"]
    denoised = [s for s in previewed.steps if s.phase == "denoise"]
    assert denoised[0].preview.size == (16, 16)  # the linear map: latent resolution
    assert denoised[1].preview.size == (SIZE, SIZE) and "vae" in denoised[1].parts
    assert denoised[1].flops > denoised[0].flops  # the preview's VAE decode is counted in its step
    assert all(s.preview is None for s in plain.steps)


# ---------------------------------------------------------------------------------------------
# Backends, precision, stopping


def test_attention_backends_reach_every_model_and_switch_at_run_time(sd_parts, sd):
    for model in (sd.denoiser, sd.vae):
        processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
        assert processors and all(isinstance(p, StudioAttnProcessor) for p in processors)
    assert sd.text_encoder.config._attn_implementation == "studio"
    small = dict(steps=2, height=16, width=16)
    reference = generate_image(sd, **small)
    eager = studio_pipeline(sd_parts, attention="eager")
    np.testing.assert_allclose(generate_image(eager, **small).pixels, reference.pixels, atol=1e-5)
    with backends.use(attention="tiled"):
        np.testing.assert_allclose(generate_image(sd, **small).pixels, reference.pixels, atol=1e-5)


def test_precision_scope_converts_and_restores(sd):
    fp32 = generate_image(sd)
    with backends.use(precision="bf16"):
        bf16 = generate_image(sd)
    assert backends.precision_of(sd.denoiser) == "bf16"
    again = generate_image(sd)  # outside the scope: the original layers are back
    assert backends.precision_of(sd.denoiser) is None
    step = lambda result: next(s for s in result.steps if s.phase == "denoise")  # noqa: E731
    assert step(bf16).bytes < step(fp32).bytes  # half the bytes for every linear weight
    assert np.abs(bf16.pixels - fp32.pixels).max() < 0.1
    np.testing.assert_array_equal(again.pixels, fp32.pixels)


def test_stop_event_ends_early_with_the_last_x0_prediction(sd):
    stop = threading.Event()
    events = []
    for event in sd.stream("a red apple", steps=5, height=SIZE, width=SIZE, stop_event=stop):
        events.append(event)
        if event.phase == "denoise" and event.index == 1:
            stop.set()
    assert [e.phase for e in events] == ["encode", "denoise", "denoise", "decode"]
    assert events[-1].image is not None and events[-1].forward_passes == 4
    stop.clear()
    result = sd("a red apple", steps=5, height=SIZE, width=SIZE, stop_event=stop)
    assert not result.stopped


def test_a_closed_stream_leaves_the_pipeline_usable(sd):
    expected = generate_image(sd)
    stream = sd.stream("a red apple", steps=3, seed=0, height=SIZE, width=SIZE)
    next(stream), next(stream)
    stream.close()
    np.testing.assert_array_equal(generate_image(sd).pixels, expected.pixels)


BAD_INPUTS = [
    ({"steps": 0}, "steps must be an integer from 1 to 1000"),
    ({"steps": 10**6}, "steps must be an integer from 1 to 1000"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number >= 0"),
    ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
    ({"height": 33}, "height must be a multiple of 2"),
    ({"width": 0}, "width must be a multiple of 2"),
    ({"width": 10**5}, "width must be a multiple of 2 .* to 4096"),
    ({"seed": -1}, "seed must be an integer from 0 to 2\\*\\*64 - 1"),
    ({"seed": 2**64}, "seed must be an integer"),
    ({"scheduler": "lms"}, "unknown scheduler 'lms'; use one of ddim, euler"),
    ({"cfg_mode": "parallel"}, "unknown cfg_mode"),
    ({"prompt": None}, "the prompt must be a string"),
    ({"prompt": "abc \ud800"}, "the prompt holds a lone surrogate"),
    ({"negative_prompt": "\udfff"}, "the negative prompt holds a lone surrogate"),
    ({"image": "apple.png"}, "image must be a PIL image"),
    ({"image": Image.new("RGB", (SIZE, SIZE)), "strength": 1.5}, "strength must be a number in"),
    ({"image": Image.new("RGB", (SIZE, SIZE)), "steps": 2, "strength": 0.2}, "leaves no denoising step"),
    ({"vae_preview_every": -2}, "vae_preview_every must be an integer >= 0"),
]


@pytest.mark.parametrize("kwargs, message", BAD_INPUTS, ids=[str(k) for k, _ in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(sd, kwargs, message):
    prompt = kwargs.pop("prompt", "a red apple")
    with pytest.raises(ValueError, match=message):
        sd(prompt, **{"height": SIZE, "width": SIZE, **kwargs})


def test_the_pipeline_stays_usable_after_bad_input(sd):
    expected = generate_image(sd)
    with pytest.raises(ValueError):
        generate_image(sd, steps=-3)
    np.testing.assert_array_equal(generate_image(sd).pixels, expected.pixels)


# ---------------------------------------------------------------------------------------------
# Loading


def test_from_pretrained_loads_a_saved_pipeline(saved_sd):
    folder, parts = saved_sd
    loaded = LatentDiffusionPipeline.from_pretrained(str(folder))
    assert isinstance(loaded.denoiser, UNet2DConditionModel) and loaded.dtype == torch.float32
    np.testing.assert_allclose(generate_image(loaded).pixels, generate_image(studio_pipeline(parts)).pixels, atol=1e-5)
    with_euler = LatentDiffusionPipeline.from_pretrained(str(folder), scheduler="euler")
    assert isinstance(with_euler.scheduler, EulerDiscreteScheduler)


def test_from_pretrained_refuses_pickle_weights(tmp_path):
    stock_sd(tiny_sd_components()).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(LoadError, match="only pickle weights"):
        LatentDiffusionPipeline.from_pretrained(str(tmp_path))


def test_from_pretrained_explains_what_it_cannot_load(tmp_path):
    with pytest.raises(LoadError, match="could not load the diffusion model"):
        LatentDiffusionPipeline.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown scheduler"):
        LatentDiffusionPipeline.from_pretrained(str(tmp_path), scheduler="fastest")


# ---------------------------------------------------------------------------------------------
# Previews


class LinearVAE(torch.nn.Module):
    """A stand-in VAE whose decoder is exactly linear in the (scaled) latents, upsampled x2."""

    def __init__(self, weights, bias, scaling_factor=0.5):
        super().__init__()
        self.config = SimpleNamespace(latent_channels=len(weights), scaling_factor=scaling_factor)
        self.weights = torch.nn.Parameter(torch.tensor(weights), requires_grad=False)
        self.bias = torch.tensor(bias)

    def decode(self, z):
        rgb = torch.einsum("bchw,cr->brhw", z * self.config.scaling_factor, self.weights) + self.bias[:, None, None]
        return SimpleNamespace(sample=torch.nn.functional.interpolate(rgb, scale_factor=2))


def test_fitting_recovers_a_linear_decoder():
    weights = [[0.3, -0.1, 0.2], [0.0, 0.4, -0.3], [-0.2, 0.1, 0.5], [0.1, 0.1, 0.1]]
    fitted = fit_latent_rgb_factors(LinearVAE(weights, [0.05, -0.02, 0.1]))
    np.testing.assert_allclose(fitted.weights, weights, atol=1e-5)
    np.testing.assert_allclose(fitted.bias, [0.05, -0.02, 0.1], atol=1e-5)


def test_latents_to_preview_maps_channels_to_colours():
    factors = LatentRGBFactors(weights=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), bias=(0.0, 0.0, -1.0))
    latents = torch.zeros(1, 2, 3, 5)
    latents[0, 0, 0, 0] = 1.0  # pure red where channel 0 is 1
    pixels = np.asarray(latents_to_preview(latents, factors))
    assert pixels.shape == (3, 5, 3)
    assert tuple(pixels[0, 0]) == (255, 128, 0) and tuple(pixels[1, 1]) == (128, 128, 0)


def test_published_factors_are_chosen_by_vae_family():
    def vae(scaling_factor, blocks=(128, 256, 512, 512)):
        config = SimpleNamespace(block_out_channels=list(blocks), latent_channels=4, scaling_factor=scaling_factor)
        return SimpleNamespace(config=config)

    assert known_factors(vae(0.18215)) is SD15_FACTORS
    assert known_factors(vae(0.13025)) is SDXL_FACTORS
    assert known_factors(vae(0.18215, blocks=(32, 64))) is None  # a tiny VAE with a default config: fitted instead
    assert known_factors(tiny_vae()) is None


def test_a_tiny_vae_gets_fitted_preview_factors(sd_parts):
    pipe = studio_pipeline(sd_parts)
    assert pipe.preview_factors is None
    generate_image(pipe, steps=1)
    assert pipe.preview_factors.channels == 4 and "fitted" in pipe.preview_factors.source


# ---------------------------------------------------------------------------------------------
# The command line


def test_cli_imagine_writes_the_image(saved_sd, tmp_path, capsys):
    from studio.cli import main

    folder, _ = saved_sd
    out = tmp_path / "apple.png"
    code = main(["imagine", "a red apple", "-o", str(out), "--model", str(folder), "--steps", "2", "--seed", "0",
                 "--height", "32", "--width", "32", "--scheduler", "euler"])
    assert code == 0
    assert Image.open(out).size == (SIZE, SIZE)
    err = capsys.readouterr().err
    assert "2/2" in err and "4 denoiser forward passes" in err and "denoiser" in err

    assert main(["imagine", "a red apple", "--model", str(folder), "--steps", "0"]) == 2
    assert "steps must be an integer from 1 to 1000" in capsys.readouterr().err
