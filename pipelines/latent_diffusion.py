"""The diffusion lane: prompt -> text encoder -> [denoiser x steps (x 2 with CFG)] -> VAE decode -> image.

    img = LatentDiffusionPipeline.from_pretrained("fashion-dit")
    res = img("sneaker", steps=20, guidance_scale=4.0, seed=0)
    for ev in img.stream("dress", steps=20):
        print(ev.phase, ev.index, ev.timestep, ev.forward_passes, ev.ms)

The loop is ours; the models and schedulers are diffusers' own. It walks the highway in order:

    1. check the inputs
    2. encode the prompt and the negative (or empty) prompt, once
    3. prepare the timesteps of the chosen scheduler
    4. prepare the latents: seeded noise, or (img2img) the VAE-encoded image noised to where the
       remaining steps start
    5. denoise_step, once per timestep: scale the input, run the denoiser (twice with
       classifier-free guidance: one batch of two, or two calls), apply guidance, step the scheduler
    6. decode the latents with the VAE

Three families of denoiser run through the same loop: Stable-Diffusion-style UNets conditioned on
text (CLIP), PixArt-style transformers conditioned on text (T5, with a padding mask), and
DiT-style transformers conditioned on a class, where the prompt is a class name and the empty
prompt is the "null" class the model learned for guidance.

Depends on torch, diffusers, transformers (through studio.integrations, for the text encoders),
the studio core and pipelines.previews; never on Gradio or the UI.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError

from studio import backends
from studio.backends.attention import check_name as check_attention_name
from studio.backends.precision import PrecisionLinear
from studio.events import Step
from studio.cost import tensor_bytes
from studio.integrations import diffusers as studio_diffusers
from studio.integrations import transformers as studio_transformers
from studio.loading import LoadError, check_weights_format, resolve_device, resolve_dtype
from studio.profiling import StepTimer, StepTiming, count_flops

from .fast_diffusion import enable_fast_path, unread_projections
from .previews import LatentRGBFactors, fit_latent_rgb_factors, known_factors, latents_to_preview

# Schedulers by name, each built from the loaded model's own scheduler config (its noise schedule).
SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # as Stable Diffusion 1.x ships it
}
CFG_MODES = ("batched", "sequential")
PREVIEWS = ("linear", None)
COMPONENTS = ("text_encoder", "denoiser", "vae")  # the models whose share of each step is reported

MAX_SIDE = 4096  # pixels per side; far past what any supported model was trained for
SEED_LIMIT = 2**64  # torch generators take seeds in [0, 2**64)
# PixArt-alpha's max_sequence_length: T5 tokenizers declare no useful model_max_length of their own
TRANSFORMER_PROMPT_TOKENS = 120


@dataclass(kw_only=True)
class DenoiseStep(Step):
    """One step of the diffusion lane. phase: "encode" | "denoise" | "decode".

    encode: index 0 is the prompt (the text encoder, or for DiT the class-name lookup); index 1,
    in img2img, the input image (the VAE encoder). denoise: one step per timestep. decode: the VAE
    turns the final latents into the image.
    """

    total: int = 0  # denoising steps this run takes
    timestep: float | None = None
    sigma: float | None = None  # noise level of the timestep: sqrt((1 - alpha_bar) / alpha_bar)
    passes: int = 0  # denoiser forward passes in this step: 2 with classifier-free guidance, 1 without
    forward_passes: int = 0  # denoiser forward passes so far in this run
    denoiser_calls: int = 0  # calls in this step: batched guidance makes both passes in one call of batch 2
    warmup: bool = False  # the first denoising step: one-off set-up (and, once per shape, FLOP counting) lands here
    preview: Image.Image | None = None  # the x0 prediction at this step
    preview_kind: str | None = None  # "linear" (latent -> RGB map, latent resolution) | "vae" (full decode)
    image: Image.Image | None = None  # decode: the final image
    pixels: np.ndarray | None = None  # decode: the same, float32 [H, W, 3] in [0, 1], before rounding to 8 bits
    parts: dict[str, StepTiming] = field(default_factory=dict)  # model -> its device time within this step

    @property
    def shares(self) -> dict[str, float]:
        """The share of this step's device time spent in each model; "other" is the rest
        (tokenizing, scaling, guidance, the scheduler, linear previews)."""
        total = self.ms
        if not total:
            return {}
        shares = {name: self.parts[name].ms / total if name in self.parts else 0.0 for name in COMPONENTS}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares


class DenoiserCall(NamedTuple):
    flops: int
    bytes: int
    input_shape: tuple[int, ...]  # the latent batch: 2 rows for batched guidance


@dataclass
class DiffusionResult:
    image: Image.Image
    pixels: np.ndarray  # float32 [H, W, 3] in [0, 1]
    steps: list[DenoiseStep]
    stopped: bool  # stopped early: the image is the decoded x0 prediction of the last step taken

    @property
    def forward_passes(self) -> int:
        return self.steps[-1].forward_passes

    @property
    def ms(self) -> float:
        return sum(step.ms for step in self.steps)

    @property
    def shares(self) -> dict[str, float]:
        """The share of the whole run's device time spent in each model."""
        total = self.ms
        shares = {name: sum(s.parts[name].ms for s in self.steps if name in s.parts) / total for name in COMPONENTS}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        return shares


class LatentDiffusionPipeline:
    def __init__(
        self,
        denoiser,
        vae,
        scheduler,
        text_encoder=None,
        tokenizer=None,
        class_ids: dict[str, int] | None = None,
        *,
        device: str | torch.device | None = None,
        attention: str | None = None,
        precision: str | None = None,
        preview_factors: LatentRGBFactors | None = None,
        max_prompt_tokens: int | None = None,
        fast_path: bool | None = None,
    ):
        """Components as diffusers builds them: a UNet2DConditionModel or a transformer denoiser,
        an AutoencoderKL, a scheduler (its config is the noise schedule every run starts from),
        and either a text encoder with its tokenizer or, for class-conditioned DiT-style models,
        `class_ids` mapping class names to ids (numbers work as prompts too). fast_path:
        channels-last and fused QKV (fast_diffusion.py); None: on for CUDA, off elsewhere."""
        if attention is not None:
            check_attention_name(attention)
        if text_encoder is None and getattr(denoiser.config, "num_embeds_ada_norm", None) is None:
            raise ValueError(
                f"{type(denoiser).__name__} takes neither text nor class labels: give a text encoder and tokenizer, "
                "or a class-conditioned (DiT-style) denoiser"
            )
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("a text encoder needs its tokenizer and a tokenizer its text encoder")
        self.denoiser = denoiser.eval()
        self.vae = vae.eval()
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.class_ids = {name.lower(): i for name, i in (class_ids or {}).items()}
        self.device = torch.device(device) if device is not None else next(denoiser.parameters()).device
        self.dtype = next(denoiser.parameters()).dtype
        self.attention = attention
        self.precision = precision

        self.is_unet = isinstance(denoiser, UNet2DConditionModel)
        self.conditioning = "text" if text_encoder is not None else "class"
        if max_prompt_tokens is None and tokenizer is not None:
            max_prompt_tokens = tokenizer.model_max_length if self.is_unet else TRANSFORMER_PROMPT_TOKENS
        self.max_prompt_tokens = max_prompt_tokens
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        # a transformer cuts the latent into patches, so sizes must fit whole patches too
        self.size_multiple = self.vae_scale_factor * (getattr(denoiser.config, "patch_size", None) or 1)
        sample_size = denoiser.config.sample_size
        rows, cols = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        self.default_size = (rows * self.vae_scale_factor, cols * self.vae_scale_factor)
        self.preview_factors = preview_factors or known_factors(vae)  # None: fitted on first use

        # the studio's backends on every attention: denoiser, VAE (its mid-block) and text encoder
        studio_diffusers.use_studio_attention(self.denoiser)
        if any(isinstance(module, Attention) for module in self.vae.modules()):
            studio_diffusers.use_studio_attention(self.vae)
        if self.text_encoder is not None:
            studio_transformers.use_studio_attention(self.text_encoder)
        self._flops: dict[tuple, int] = {}  # FLOPs of one call, by component, attention kernel and input shapes
        self.weight_bytes: dict[str, int] = {}
        self._sync_precision()
        self.fast_path_report = None
        if fast_path or (fast_path is None and self.device.type == "cuda"):
            enable_fast_path(self)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: str | torch.device | None = None,
        attention: str | None = None,
        precision: str | None = None,
        scheduler: str | None = None,
        allow_pickle: bool = False,
        dtype: str | torch.dtype | None = None,
        fast_path: bool | None = None,
    ) -> "LatentDiffusionPipeline":
        """Load a diffusers pipeline folder or hub id (a shipped name resolves to its folder) and
        keep its components; the stock pipeline object is dropped. safetensors only unless
        allow_pickle=True; remote code is never run. fp16 on a GPU, fp32 on the CPU by default."""
        from studio import assets

        if attention is not None:
            check_attention_name(attention)  # fail before the slow part
        check_scheduler_name(scheduler)
        device = resolve_device(device)
        # fp16, not the studio's usual bf16: diffusion checkpoints are published and tuned in fp16
        dtype = resolve_dtype(dtype if dtype is not None or device.type != "cuda" else torch.float16, device)
        path = assets.resolve(name_or_path)
        try:
            config = DiffusionPipeline.load_config(path)
        except (OSError, ValueError) as error:
            raise load_error(name_or_path, error, assets) from error
        unused = unused_components(config)
        # each component has its own folder and its own weights: one of them holding only pickles is
        # refused even when another (the text encoder, say) holds safetensors
        for part in config:
            if part not in unused and isinstance(config[part], (list, tuple)):
                check_weights_format(Path(path) / part, allow_pickle)
        try:
            stock = DiffusionPipeline.from_pretrained(
                path, dtype=dtype, use_safetensors=None if allow_pickle else True, trust_remote_code=False, **unused
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # SafetensorError: a damaged file
            raise load_error(name_or_path, error, assets) from error
        stock.to(device, dtype)  # a no-op where `dtype=` was understood; older diffusers releases call it torch_dtype
        parts = stock.components
        pipeline = cls(
            parts["unet"] if "unet" in parts else parts["transformer"], parts["vae"], parts["scheduler"],
            parts.get("text_encoder"), parts.get("tokenizer"), getattr(stock, "labels", None) or None,
            device=device, attention=attention, precision=precision, fast_path=fast_path,
        )
        if scheduler is not None:
            pipeline.scheduler = pipeline.make_scheduler(scheduler)
        return pipeline

    # -----------------------------------------------------------------------------------------
    # The public API

    def __call__(self, prompt: str = "", **kwargs) -> DiffusionResult:
        steps = list(self.stream(prompt, **kwargs))
        decoded = steps[-1]
        denoised = sum(1 for step in steps if step.phase == "denoise")
        return DiffusionResult(decoded.image, decoded.pixels, steps, stopped=denoised < decoded.total)

    def stream(
        self,
        prompt: str = "",
        *,
        negative_prompt: str | None = None,
        steps: int = 20,
        guidance_scale: float = 5.0,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        cfg_mode: str = "batched",
        image: Image.Image | None = None,
        strength: float = 0.8,
        preview: str | None = "linear",
        vae_preview_every: int = 0,
        stop_event: threading.Event | None = None,
    ):
        """Yield a DenoiseStep for every step: encode, each denoising step, decode.

        guidance_scale 1.0 skips the unconditional pass (the guidance formula reduces to the
        conditional prediction); any other value >= 0 applies it, so 0 gives the unconditional
        image. cfg_mode "batched" runs both passes as one batch of two, "sequential" as two calls.
        image= turns on img2img: `strength` of the schedule is run, starting from the image.
        preview "linear" shows each step's x0 prediction through a latent -> RGB map;
        vae_preview_every=N decodes it with the VAE instead every N-th step. Neither changes the
        result. Stop between steps by closing the generator, or by setting stop_event: the VAE then
        decodes the last x0 prediction.
        """
        # 1. Check the inputs: every bad value is refused here, before any work or state changes
        height, width = self.check_inputs(
            prompt, negative_prompt, steps, guidance_scale, seed, height, width, scheduler, cfg_mode, image,
            strength, preview, vae_preview_every,
        )
        use_guidance = guidance_scale != 1.0
        # On the CPU whatever the device, as diffusers does for a CPU generator: a seed gives the
        # same starting noise on every machine.
        generator = torch.Generator("cpu").manual_seed(seed)
        timer = StepTimer(self.device)
        with self._stage():
            self._sync_precision()
            if preview == "linear" and self.preview_factors is None:
                self.preview_factors = fit_latent_rgb_factors(self.vae)

        # 2. Encode the prompt and the negative (or empty) prompt, once
        with self._stage():
            conditioning, negative, event = self.encode_prompt(
                prompt, negative_prompt, use_guidance, height, width, timer
            )
        yield event

        # 3. Prepare the timesteps: a fresh scheduler per run, so runs never share its state
        schedule = self.make_scheduler(scheduler)
        schedule.set_timesteps(steps, device=self.device)
        timesteps = schedule.timesteps

        # 4. Prepare the latents
        shape = (1, self.denoiser.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if image is None:
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            latents = noise * schedule.init_noise_sigma
        else:
            # img2img: skip the noisiest (1 - strength) of the schedule and start from the image's
            # latents, noised to the level where the remaining steps begin
            timesteps = img2img_timesteps(schedule, steps, strength)
            with self._stage():
                image_latents, event = self.encode_image(image, height, width, generator, timer)
            yield event
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            latents = schedule.add_noise(image_latents, noise, timesteps[:1])

        # 5. Denoise, one step per timestep (their values read to the host once, not every step)
        x0, forward_passes, taken = None, 0, 0
        for index, (t, timestep) in enumerate(zip(timesteps, timesteps.tolist())):
            if stop_event is not None and stop_event.is_set():
                break
            full_decode = vae_preview_every > 0 and (index + 1) % vae_preview_every == 0
            with self._stage():
                latents, x0, event = self.denoise_step(
                    schedule, latents, t, conditioning, negative, guidance_scale, cfg_mode, generator, timer,
                    preview="vae" if full_decode else preview,
                )
            forward_passes, taken = forward_passes + event.passes, taken + 1
            event.index, event.total, event.warmup = index, len(timesteps), index == 0
            event.timestep, event.sigma = timestep, noise_level(schedule, timestep)
            event.forward_passes = forward_passes
            yield event

        # 6. Decode: the final latents or, stopped early, the last x0 prediction
        stopped = taken < len(timesteps)
        with self._stage():
            event = self.decode(x0 if stopped and x0 is not None else latents, timer)
        event.total, event.forward_passes = len(timesteps), forward_passes
        yield event

    # -----------------------------------------------------------------------------------------
    # The stages

    def encode_prompt(self, prompt, negative_prompt, use_guidance, height, width, timer):
        """The denoiser's conditioning for the prompt and, with guidance, for the negative prompt
        (empty: unconditional), as keyword arguments of the denoiser; None for the negative
        without guidance. Both texts go through the text encoder once, as one batch."""
        negative_text = negative_prompt or ""
        if self.conditioning == "class":
            with timer.time() as timing:
                labels = ([self.class_id(negative_text)] if use_guidance else []) + [self.class_id(prompt)]
                class_labels = torch.tensor(labels, device=self.device)
            conditioning = {"class_labels": class_labels[-1:]}
            negative = {"class_labels": class_labels[:1]} if use_guidance else None
            shapes = {"class_labels": tuple(class_labels.shape)}
            event = DenoiseStep(phase="encode", index=0, timing=timing, shapes=shapes)
            return conditioning, negative, event

        texts = ([negative_text] if use_guidance else []) + [prompt]
        with timer.time() as timing:
            tokens = self.tokenizer(
                texts, padding="max_length", max_length=self.max_prompt_tokens, truncation=True, return_tensors="pt"
            )
            token_ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            # CLIP was trained without a padding mask and UNets expect its output that way; T5 and
            # PixArt use the mask, in the encoder and again in the denoiser's cross-attention
            encoder_mask = None if self.is_unet else mask
            with timer.time() as encoder_timing:
                embeddings, flops, nbytes = self.run_counted(
                    "text_encoder", lambda ids, **kw: self.text_encoder(ids, **kw)[0], token_ids,
                    attention_mask=encoder_mask,
                )
            embeddings = embeddings.to(self.dtype)
        conditioning = {"encoder_hidden_states": embeddings[-1:]}
        negative = {"encoder_hidden_states": embeddings[:1]} if use_guidance else None
        if not self.is_unet:
            size = self.size_conditioning(height, width)
            conditioning |= {"encoder_attention_mask": mask[-1:], "added_cond_kwargs": size}
            if use_guidance:
                negative |= {"encoder_attention_mask": mask[:1], "added_cond_kwargs": size}
        event = DenoiseStep(
            phase="encode", index=0, timing=timing, flops=flops, bytes=nbytes, parts={"text_encoder": encoder_timing},
            shapes={"token_ids": tuple(token_ids.shape), "text_embeddings": tuple(embeddings.shape)},
        )
        return conditioning, negative, event

    def size_conditioning(self, height, width):
        """PixArt-alpha at 1024 px (sample size 128) is also conditioned on the image's size and
        aspect ratio; the other sizes take none."""
        if self.denoiser.config.sample_size != 128:
            return {"resolution": None, "aspect_ratio": None}
        return {
            "resolution": torch.tensor([[height, width]], dtype=self.dtype, device=self.device),
            "aspect_ratio": torch.tensor([[height / width]], dtype=self.dtype, device=self.device),
        }

    def encode_image(self, image, height, width, generator, timer):
        """img2img: the image, resized and scaled to [-1, 1], encoded by the VAE into latents
        (sampled from the encoder's distribution, as diffusers' img2img pipelines do)."""
        with timer.time() as timing:
            pixels = self.image_processor.preprocess(image, height=height, width=width)
            pixels = pixels.to(self.device, self.dtype)
            with timer.time() as vae_timing:
                distribution, flops, nbytes = self.run_counted(
                    "vae_encoder", lambda x: self.vae.encode(x).latent_dist, pixels
                )
            latents = distribution.sample(generator) * self.vae.config.scaling_factor
        event = DenoiseStep(
            phase="encode", index=1, timing=timing, flops=flops, bytes=nbytes, parts={"vae": vae_timing},
            shapes={"input_image": tuple(pixels.shape), "image_latents": tuple(latents.shape)},
        )
        return latents, event

    def denoise_step(
        self, schedule, latents, t, conditioning, negative, guidance_scale, cfg_mode, generator, timer, preview
    ):
        """One step: the denoiser's guided prediction at timestep t, the scheduler's move to the
        next, less noisy latents, and a preview of the x0 prediction ("linear", "vae" or None).
        Returns the new latents, the x0 prediction and the step's event."""
        with timer.time() as timing:
            latent_input = schedule.scale_model_input(latents, t)
            with timer.time() as denoiser_timing:
                prediction, calls = self.predict_noise(
                    latent_input, t, conditioning, negative, guidance_scale, cfg_mode
                )
            extra = {"generator": generator} if "generator" in inspect.signature(schedule.step).parameters else {}
            output = schedule.step(prediction, t, latents, **extra)
            x0 = getattr(output, "pred_original_sample", None)
            if x0 is None:
                x0 = predicted_x0(schedule, prediction, latents, t)
            parts = {"denoiser": denoiser_timing}
            flops, nbytes = sum(call.flops for call in calls), sum(call.bytes for call in calls)
            image = None
            if preview == "vae":
                with timer.time() as parts["vae"]:
                    decoded, vae_flops, vae_bytes = self.run_counted("vae_decoder", self.decode_latents, x0)
                image = self.image_processor.postprocess(decoded, output_type="pil")[0]
                flops, nbytes = flops + vae_flops, nbytes + vae_bytes
            elif preview == "linear":
                image = latents_to_preview(x0, self.preview_factors)  # one small copy to the host
        batch = calls[0].input_shape[0]
        shapes = {"latents": tuple(latents.shape), "denoiser_input": calls[0].input_shape}
        for name, stage in (("encoder_hidden_states", "text_embeddings"), ("class_labels", "class_labels")):
            if name in conditioning:
                shapes[stage] = (batch, *conditioning[name].shape[1:])
        shapes["noise_pred"] = tuple(prediction.shape)
        event = DenoiseStep(
            phase="denoise", index=0, timing=timing, passes=1 if negative is None else 2, denoiser_calls=len(calls),
            flops=flops, bytes=nbytes, parts=parts,
            preview=image, preview_kind=preview if image is not None else None, shapes=shapes,
        )
        return output.prev_sample, x0, event

    def predict_noise(self, latent_input, t, conditioning, negative, guidance_scale, cfg_mode):
        """The denoiser's prediction with classifier-free guidance:
        uncond + guidance_scale * (cond - uncond). Returns it and the DenoiserCalls made."""
        if negative is None:
            prediction, call = self.run_denoiser(latent_input, t, conditioning)
            return prediction, [call]
        if cfg_mode == "batched":
            both, call = self.run_denoiser(torch.cat([latent_input] * 2), t, concat_conditions(negative, conditioning))
            uncond, cond = both.chunk(2)
            calls = [call]
        else:
            uncond, uncond_call = self.run_denoiser(latent_input, t, negative)
            cond, cond_call = self.run_denoiser(latent_input, t, conditioning)
            calls = [uncond_call, cond_call]
        return uncond + guidance_scale * (cond - uncond), calls

    def run_denoiser(self, latent_input, t, conditioning):
        """One denoiser call on a batch of latents; returns the prediction and the call's DenoiserCall."""
        timestep = t.expand(latent_input.shape[0])
        prediction, flops, nbytes = self.run_counted(
            "denoiser", lambda x, **kw: self.denoiser(x, **kw, return_dict=False)[0], latent_input, timestep=timestep,
            **conditioning,
        )
        # DiT and PixArt also predict the noise variance, in the second half of their channels; these
        # schedulers use a fixed variance, so it is dropped, as diffusers' pipelines do
        channels = latent_input.shape[1]
        if prediction.shape[1] == 2 * channels:
            prediction = prediction[:, :channels]
        return prediction, DenoiserCall(flops, nbytes, tuple(latent_input.shape))

    def decode(self, latents, timer):
        with timer.time() as timing:
            with timer.time() as vae_timing:
                decoded, flops, nbytes = self.run_counted("vae_decoder", self.decode_latents, latents)
            pixels = self.image_processor.postprocess(decoded, output_type="np")
        return DenoiseStep(
            phase="decode", index=0, timing=timing, flops=flops, bytes=nbytes, parts={"vae": vae_timing},
            shapes={"latents": tuple(latents.shape), "image": tuple(decoded.shape)},
            image=self.image_processor.numpy_to_pil(pixels)[0], pixels=pixels[0],
        )

    def decode_latents(self, latents):
        """Latents as the denoiser sees them -> the VAE's image in [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    # -----------------------------------------------------------------------------------------
    # Measuring a call

    def run_counted(self, component, fn, *args, **kwargs):
        """fn(*args, **kwargs) with its cost: (output, FLOPs, bytes).

        FLOPs are counted by torch's FlopCounterMode the first time a component meets a set of
        input shapes (and attention kernel), then reused: counting costs time, and the count
        depends on nothing else. Bytes are an estimate of the traffic to device memory: the
        component's weights, read once per call, plus the tensors in and out. Activations that
        spill out of the caches are not counted, so it is a lower bound; it is the weight bytes
        that make a batch of two cheaper than two calls.
        """
        key = (component, backends.current().attention, tensor_shapes((args, kwargs)))
        if key in self._flops:
            output = fn(*args, **kwargs)
        else:
            output, self._flops[key] = count_flops(fn, *args, **kwargs)
        nbytes = self.weight_bytes[component] + tensor_bytes((args, kwargs)) + tensor_bytes(output)
        return output, self._flops[key], nbytes

    # -----------------------------------------------------------------------------------------
    # Set-up and input handling

    @contextlib.contextmanager
    def _stage(self):
        """Where every model call runs: no autograd, this pipeline's attention kernel. Entered per
        stage and never held across a yield, so between events the caller's own choice holds."""
        with torch.no_grad(), backends.use(attention=self.attention):
            yield

    def _sync_precision(self):
        """Apply the precision chosen for this call (backends.use() scope, else the pipeline's) to
        the linear layers of the denoiser and the text encoder, where the FLOPs are; the VAE is
        mostly convolutions and keeps its dtype."""
        wanted = backends.current().precision or self.precision
        for model in (self.denoiser, self.text_encoder):
            if model is not None and wanted != backends.precision_of(model):
                if wanted is None:
                    backends.restore_precision(model)
                else:
                    backends.apply_precision(model, wanted)
        self.weight_bytes = {
            "text_encoder": weight_bytes(self.text_encoder),
            "denoiser": weight_bytes(self.denoiser),
            "vae_encoder": weight_bytes(self.vae.encoder, getattr(self.vae, "quant_conv", None)),
            "vae_decoder": weight_bytes(self.vae.decoder, getattr(self.vae, "post_quant_conv", None)),
        }

    def make_scheduler(self, name: str | None):
        """A fresh scheduler: `name` from SCHEDULERS, or None for the pipeline's own, built on the
        pipeline's noise schedule (its scheduler config)."""
        if name is None:
            return type(self.scheduler).from_config(self.scheduler.config)
        scheduler_class, options = SCHEDULERS[name]
        return scheduler_class.from_config(self.scheduler.config, **options)

    @property
    def class_names(self) -> list[str]:
        """The class names a class-conditioned model takes as prompts (empty for text models)."""
        return sorted(self.class_ids)

    def class_id(self, name: str) -> int:
        """A class name (any case) or number -> the class id; "" -> the null class of guidance."""
        name = name.strip().lower()
        null_class = self.denoiser.config.num_embeds_ada_norm  # the extra embedding learned with dropped labels
        if not name:
            return null_class
        if name in self.class_ids:
            return self.class_ids[name]
        if name.isdigit() and int(name) < null_class:
            return int(name)
        close = difflib.get_close_matches(name, self.class_ids, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"{name!r} is not one of this model's {null_class} classes: give a class name or a number below "
            f"{null_class}, or an empty prompt for an unconditional image{hint}"
        )

    def check_inputs(
        self, prompt, negative_prompt, steps, guidance_scale, seed, height, width, scheduler, cfg_mode, image, strength,
        preview, vae_preview_every,
    ) -> tuple[int, int]:
        """Refuse bad input with a message saying what to give instead; returns (height, width)."""
        if not isinstance(prompt, str):
            raise ValueError(
                f"the prompt must be a string (empty for an unconditional image); got {type(prompt).__name__}"
            )
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"the negative prompt must be a string or None; got {type(negative_prompt).__name__}")
        if self.conditioning == "class":
            self.class_id(prompt)
            self.class_id(negative_prompt or "")
        limit = self.scheduler.config.num_train_timesteps
        if not is_integer(steps) or not 1 <= steps <= limit:
            raise ValueError(
                f"steps must be an integer from 1 to {limit} (the model's training timesteps); got {steps!r}"
            )
        if not is_real(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be a finite number >= 0 (1.0 turns guidance off); got {guidance_scale!r}"
            )
        if not is_integer(seed) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer from 0 to 2**64 - 1; got {seed!r}")
        check_scheduler_name(scheduler)
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"unknown cfg_mode {cfg_mode!r}; use one of {', '.join(CFG_MODES)}")
        if preview not in PREVIEWS:
            raise ValueError(f"unknown preview {preview!r}; use 'linear' or None")
        if not is_integer(vae_preview_every) or vae_preview_every < 0:
            raise ValueError(f"vae_preview_every must be an integer >= 0 (0: never); got {vae_preview_every!r}")
        if image is not None:
            if not isinstance(image, Image.Image):
                raise ValueError(f"image must be a PIL image; got {type(image).__name__}")
            if not is_real(strength) or not 0 < strength <= 1:
                raise ValueError(f"strength must be a number in (0, 1]; got {strength!r}")
            if int(steps * strength) < 1:
                raise ValueError(
                    f"steps x strength = {steps} x {strength} leaves no denoising step; raise steps or strength"
                )
            # an input image sets the size, rounded down to whole latents
            if height is None and width is None:
                multiple = self.size_multiple
                height, width = image.height // multiple * multiple, image.width // multiple * multiple
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not is_integer(value) or not 0 < value <= MAX_SIDE or value % self.size_multiple:
                raise ValueError(
                    f"{name} must be a multiple of {self.size_multiple} (the VAE's factor {self.vae_scale_factor}"
                    f"{' times the patch size' if self.size_multiple != self.vae_scale_factor else ''}) "
                    f"from {self.size_multiple} to {MAX_SIDE}; got {value!r}"
                )
        return height, width


# ---------------------------------------------------------------------------------------------
# Helpers


def check_scheduler_name(name: str | None) -> None:
    if name is not None and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")


def unused_components(config: dict) -> dict:
    """The components of a diffusers pipeline folder that this lane does not run, passed as None so
    that they are not loaded (the safety checker alone is a 1.2 GB model); refuses pipelines the
    loop does not fit."""
    name = config.get("_class_name", "this pipeline")
    if "text_encoder_2" in config:
        raise LoadError(f"{name} has two text encoders (SDXL-style), which the diffusion lane does not run yet")
    if "vae" not in config or ("unet" not in config and "transformer" not in config):
        raise LoadError(f"{name} is not a latent diffusion pipeline: the lane needs a VAE and a UNet or transformer")
    unused = {part: None for part in ("safety_checker", "feature_extractor", "image_encoder") if part in config}
    if "requires_safety_checker" in config:
        unused["requires_safety_checker"] = False
    return unused


def load_error(name_or_path, error, assets) -> LoadError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return LoadError(
        f"could not load the diffusion model {name_or_path!r}: {first}. Use a shipped name "
        f"({', '.join(assets.list_models('diffusion')) or 'none installed'}), a local diffusers folder with "
        "safetensors weights, or a hub id while online"
    )


def img2img_timesteps(schedule, steps: int, strength: float) -> torch.Tensor:
    """The last `strength` of the schedule, as diffusers' img2img pipelines take it."""
    kept = min(int(steps * strength), steps)
    start = (steps - kept) * schedule.order
    if hasattr(schedule, "set_begin_index"):
        schedule.set_begin_index(start)
    return schedule.timesteps[start:]


def concat_conditions(first: dict, second: dict) -> dict:
    """Two sets of denoiser keyword arguments as one batch: tensors concatenated, None kept."""
    joined = {}
    for name, value in first.items():
        if isinstance(value, torch.Tensor):
            joined[name] = torch.cat([value, second[name]])
        elif isinstance(value, dict):
            joined[name] = concat_conditions(value, second[name])
        else:
            joined[name] = value
    return joined


def predicted_x0(schedule, prediction, latents, t):
    """x0 from the model's prediction, for schedulers that do not report it (DPM-Solver, PNDM).
    They work on x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise."""
    # indexed on the device: reading t to the host would make the loop wait for the GPU
    alpha_bar = schedule.alphas_cumprod.to(latents.device, torch.float32)[t.round().long()]
    x_t, prediction = latents.float(), prediction.float()
    kind = schedule.config.prediction_type
    if kind == "epsilon":
        x0 = (x_t - (1 - alpha_bar).sqrt() * prediction) / alpha_bar.sqrt()
    elif kind == "v_prediction":
        x0 = alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * prediction
    else:  # "sample": the model predicts x0 itself
        x0 = prediction
    return x0.to(latents.dtype)


def noise_level(schedule, t: float) -> float:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) at timestep t, interpolated between whole
    timesteps as Euler-type schedulers do: the noise-to-signal ratio they step through."""
    alphas = schedule.alphas_cumprod.double()
    sigmas = ((1 - alphas) / alphas).sqrt()
    low = min(int(math.floor(t)), len(sigmas) - 1)
    high = min(low + 1, len(sigmas) - 1)
    weight = t - low
    return float(sigmas[low] * (1 - weight) + sigmas[high] * weight)


def weight_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of weights one forward pass through `modules` (None: absent) reads: every parameter
    once; a layer converted by backends.apply_precision reads its converted weights, not the
    original kept for restoring; projections replaced by fused ones (the fast path) are not read."""
    total = 0
    for module in (m for m in modules if m is not None):
        unread = unread_projections(module)
        converted = [m for m in module.modules() if isinstance(m, PrecisionLinear) and m not in unread]
        kept = {id(m.original.weight) for m in converted} | {id(p) for m in unread for p in m.parameters()}
        total += sum(p.nbytes for p in module.parameters() if id(p) not in kept)
        total += sum(m.weight_bytes() for m in converted)
    return total


def tensor_shapes(value):
    """A hashable summary (shape and dtype of every tensor) of nested arguments."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return tuple((name, tensor_shapes(v)) for name, v in value.items())
    if isinstance(value, (tuple, list)):
        return tuple(tensor_shapes(v) for v in value)
    return None


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
