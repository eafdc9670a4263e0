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
import importlib
import inspect
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import SafetensorError

from studio import adapters, assets, backends
from studio.adapters import attached
from studio.backends.attention import check_name as check_attention_name
from studio.events import Step
from studio.integrations import diffusers as studio_diffusers
from studio.integrations import transformers as studio_transformers
from studio.loading import (
    LoadError,
    check_weights_format,
    resolve_device,
    resolve_dtype,
)
from studio.profiling import StepTimer, StepTiming

from .diffusion_cost import CostMeter, component_weight_bytes
from .diffusion_request import SCHEDULERS, DiffusionRequest, check_scheduler_name
from .fast_diffusion import enable_fast_path
from .previews import (
    LatentRGBFactors,
    fit_latent_rgb_factors,
    known_factors,
    latents_to_preview,
)

COMPONENTS = ("text_encoder", "denoiser", "vae")  # the models whose share of each step is reported
RUN_COMPONENTS = ("unet", "transformer", "vae", "scheduler", "text_encoder", "tokenizer")  # what the lane loads
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
    adapter: str | None = None  # the LoRA adapter that ran (None: the base model)
    notice: str | None = None  # something the user should be told once, e.g. that a compiled model fell back

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
        self.flops_cache: dict[tuple, int] = {}  # FLOPs of one call, by component and input shapes
        self.adapters: dict[str, adapters.Adapter] = {}  # the LoRA adapters loaded, by name
        self.sync_precision(precision)
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
            raise load_error(name_or_path, error) from error
        check_pipeline_config(config)
        # each component has its own folder and its own weights: one of them holding only pickles is
        # refused even when another (the text encoder, say) holds safetensors
        for part in RUN_COMPONENTS:
            if isinstance(config.get(part), (list, tuple)):
                check_weights_format(Path(path) / part, allow_pickle)
        try:
            parts = load_components(path, config, dtype, allow_pickle)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:  # SafetensorError: a damaged file
            raise load_error(name_or_path, error) from error
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.to(device)
        pipeline = cls(
            parts["unet"] if "unet" in parts else parts["transformer"], parts["vae"], parts["scheduler"],
            parts.get("text_encoder"), parts.get("tokenizer"), class_names(config.get("id2label")),
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
        adapter: str | None = None,
        adapter_scale: float = 1.0,
    ):
        """An iterator of DenoiseSteps, one for every step: encode, each denoising step, decode.

        guidance_scale 1.0 skips the unconditional pass (the guidance formula reduces to the
        conditional prediction); any other value >= 0 applies it, so 0 gives the unconditional
        image. cfg_mode "batched" runs both passes as one batch of two, "sequential" as two calls.
        image= turns on img2img: `strength` of the schedule is run, starting from the image.
        preview "linear" shows each step's x0 prediction through a latent -> RGB map;
        vae_preview_every=N decodes it with the VAE instead every N-th step. Neither changes the
        result. Stop between steps by closing the iterator, or by setting stop_event: the VAE then
        decodes the last x0 prediction. adapter: the name of a LoRA adapter loaded with
        load_adapter(), its low-rank terms times adapter_scale added to the denoiser (and the
        text encoder, where it has weights for it).

        The inputs are checked, and the backends chosen (a `backends.use()` scope around this
        call, else the pipeline's defaults), when stream() is called; they hold for the whole run.
        """
        choice = backends.resolve(self.attention, self.precision)
        request = DiffusionRequest.checked(
            self, prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed,
            height=height, width=width, scheduler=scheduler, cfg_mode=cfg_mode, image=image, strength=strength,
            preview=preview, vae_preview_every=vae_preview_every, stop_event=stop_event,
            attention=choice.attention, precision=choice.precision, adapter=adapter, adapter_scale=adapter_scale,
        )
        return self._run(request)

    def _run(self, request: DiffusionRequest):
        """The highway, numbered as diffusers' pipelines number it (1., checking, was stream()'s)."""
        # On the CPU whatever the device, as diffusers does for a CPU generator: a seed gives the
        # same starting noise on every machine.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        with self._stage(request):
            self.sync_precision(request.precision)
            if request.preview == "linear" and self.preview_factors is None:
                self.preview_factors = fit_latent_rgb_factors(self.vae)

        timer, meter = StepTimer(self.device), CostMeter(self.flops_cache, self.weight_bytes)

        # 2. Encode the prompt and the negative (or empty) prompt, once
        with self._stage(request):
            conditioning, negative, event = self.encode_prompt(request, timer, meter)
        yield event

        # 3. Prepare the timesteps: a fresh scheduler per run, so runs never share its state
        schedule = self.make_scheduler(request.scheduler)
        schedule.set_timesteps(request.steps, device=self.device)
        timesteps = schedule.timesteps
        step_options = {"generator": generator} if "generator" in inspect.signature(schedule.step).parameters else {}

        # 4. Prepare the latents: seeded noise or, img2img, the image's latents noised to where the
        # remaining steps begin (the noisiest 1 - strength of the schedule is skipped)
        shape = (1, self.denoiser.config.in_channels, request.height // self.vae_scale_factor,
                 request.width // self.vae_scale_factor)
        if request.image is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            latents = latents * schedule.init_noise_sigma
        else:
            timesteps = img2img_timesteps(schedule, request.steps, request.strength)
            with self._stage(request):
                image_latents, event = self.encode_image(request, generator, timer, meter)
            yield event
            noise = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            latents = schedule.add_noise(image_latents, noise, timesteps[:1])

        # 5. Denoise, one step per timestep (their values read to the host once, not every step)
        both = concat_conditions(negative, conditioning) if negative is not None else None
        x0, forward_passes, taken = None, 0, 0
        for index, (t, timestep) in enumerate(zip(timesteps, timesteps.tolist())):
            if request.cancelled:
                break
            parts = {}
            with self._stage(request), timer.time() as timing:
                latent_input = schedule.scale_model_input(latents, t)
                with timer.time() as parts["denoiser"]:
                    if negative is None:
                        noise_pred = self.denoise(latent_input, t, conditioning, meter)
                    else:  # classifier-free guidance: the unconditional and the conditional pass
                        if request.cfg_mode == "batched":
                            uncond, cond = self.denoise(torch.cat([latent_input] * 2), t, both, meter).chunk(2)
                        else:
                            uncond = self.denoise(latent_input, t, negative, meter)
                            cond = self.denoise(latent_input, t, conditioning, meter)
                        noise_pred = uncond + request.guidance_scale * (cond - uncond)
                output = schedule.step(noise_pred, t, latents, **step_options)
                x0 = getattr(output, "pred_original_sample", None)
                x0 = predicted_x0(schedule, noise_pred, latents, t) if x0 is None else x0
                latents = output.prev_sample
                preview = self.preview(x0, request.preview_at(index), timer, parts, meter)
            cost, passes = meter.take(), 1 if negative is None else 2
            forward_passes, taken = forward_passes + passes, taken + 1
            yield DenoiseStep(
                phase="denoise", index=index, timing=timing, total=len(timesteps), timestep=timestep,
                sigma=noise_level(schedule, timestep), passes=passes, forward_passes=forward_passes,
                denoiser_calls=cost.calls["denoiser"], warmup=index == 0, flops=cost.flops, bytes=cost.bytes,
                parts=parts, preview=preview, preview_kind=request.preview_at(index) if preview else None,
                shapes=self.step_shapes(latents, cost.shapes["denoiser"], conditioning, noise_pred),
                adapter=request.adapter, notice=self.fast_path_report and self.fast_path_report.news(),
            )

        # 6. Decode: the final latents or, stopped early, the last x0 prediction
        stopped = taken < len(timesteps)
        with self._stage(request):
            event = self.decode(x0 if stopped and x0 is not None else latents, timer, meter, len(timesteps), forward_passes)
        yield event

    # -----------------------------------------------------------------------------------------
    # The stages

    def encode_prompt(self, request, timer, meter):
        """The denoiser's conditioning for the prompt and, with guidance, for the negative prompt
        (empty: unconditional), as keyword arguments of the denoiser; None for the negative
        without guidance. Both texts go through the text encoder once, as one batch."""
        negative_text = request.negative_prompt or ""
        if self.conditioning == "class":
            with timer.time() as timing:
                labels = ([self.class_id(negative_text)] if request.guided else []) + [self.class_id(request.prompt)]
                class_labels = torch.tensor(labels, device=self.device)
            conditioning = {"class_labels": class_labels[-1:]}
            negative = {"class_labels": class_labels[:1]} if request.guided else None
            shapes = {"class_labels": tuple(class_labels.shape)}
            event = DenoiseStep(phase="encode", index=0, timing=timing, shapes=shapes, adapter=request.adapter)
            return conditioning, negative, event

        texts = ([negative_text] if request.guided else []) + [request.prompt]
        with timer.time() as timing:
            tokens = self.tokenizer(
                texts, padding="max_length", max_length=self.max_prompt_tokens, truncation=True, return_tensors="pt"
            )
            token_ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
            # CLIP was trained without a padding mask and UNets expect its output that way; T5 and
            # PixArt use the mask, in the encoder and again in the denoiser's cross-attention
            encoder_mask = None if self.is_unet else mask
            with timer.time() as encoder_timing:
                embeddings = meter.run(
                    "text_encoder", lambda ids, **kw: self.text_encoder(ids, **kw)[0], token_ids,
                    attention_mask=encoder_mask,
                )
            embeddings = embeddings.to(self.dtype)
        conditioning = {"encoder_hidden_states": embeddings[-1:]}
        negative = {"encoder_hidden_states": embeddings[:1]} if request.guided else None
        if not self.is_unet:
            size = self.size_conditioning(request.height, request.width)
            conditioning |= {"encoder_attention_mask": mask[-1:], "added_cond_kwargs": size}
            if request.guided:
                negative |= {"encoder_attention_mask": mask[:1], "added_cond_kwargs": size}
        cost = meter.take()
        event = DenoiseStep(
            phase="encode", index=0, timing=timing, flops=cost.flops, bytes=cost.bytes,
            parts={"text_encoder": encoder_timing}, adapter=request.adapter,
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

    def encode_image(self, request, generator, timer, meter):
        """img2img: the image, resized and scaled to [-1, 1], encoded by the VAE into latents
        (sampled from the encoder's distribution, as diffusers' img2img pipelines do)."""
        with timer.time() as timing:
            pixels = self.image_processor.preprocess(request.image, height=request.height, width=request.width)
            pixels = pixels.to(self.device, self.dtype)
            with timer.time() as vae_timing:
                distribution = meter.run("vae_encoder", lambda x: self.vae.encode(x).latent_dist, pixels)
            latents = distribution.sample(generator) * self.vae.config.scaling_factor
        cost = meter.take()
        event = DenoiseStep(
            phase="encode", index=1, timing=timing, flops=cost.flops, bytes=cost.bytes, parts={"vae": vae_timing},
            shapes={"input_image": tuple(pixels.shape), "image_latents": tuple(latents.shape)},
        )
        return latents, event

    def denoise(self, latent_input, t, conditioning, meter):
        """One denoiser call on a batch of latents: its noise prediction."""
        timestep = t.expand(latent_input.shape[0])
        prediction = meter.run(
            "denoiser", lambda x, **kw: self.denoiser(x, **kw, return_dict=False)[0], latent_input, timestep=timestep,
            **conditioning,
        )
        # DiT and PixArt also predict the noise variance, in the second half of their channels; these
        # schedulers use a fixed variance, so it is dropped, as diffusers' pipelines do
        channels = latent_input.shape[1]
        return prediction[:, :channels] if prediction.shape[1] == 2 * channels else prediction

    def preview(self, x0, kind, timer, parts, meter) -> Image.Image | None:
        """The x0 prediction as a picture: "linear" (a latent -> RGB map, latent resolution), "vae"
        (a full decode, timed as a part of the step) or None."""
        if kind == "vae":
            with timer.time() as parts["vae"]:
                decoded = meter.run("vae_decoder", self.decode_latents, x0)
            return self.image_processor.postprocess(decoded, output_type="pil")[0]
        if kind == "linear":
            return latents_to_preview(x0, self.preview_factors)  # one small copy to the host
        return None

    def step_shapes(self, latents, denoiser_input, conditioning, noise_pred) -> dict[str, tuple[int, ...]]:
        """The shapes along the highway in a denoising step."""
        shapes = {"latents": tuple(latents.shape), "denoiser_input": denoiser_input}
        for name, stage in (("encoder_hidden_states", "text_embeddings"), ("class_labels", "class_labels")):
            if name in conditioning:
                shapes[stage] = (denoiser_input[0], *conditioning[name].shape[1:])
        shapes["noise_pred"] = tuple(noise_pred.shape)
        return shapes

    def decode(self, latents, timer, meter, total: int, forward_passes: int):
        """6. The VAE turns latents into the image."""
        with timer.time() as timing:
            with timer.time() as vae_timing:
                decoded = meter.run("vae_decoder", self.decode_latents, latents)
            pixels = self.image_processor.postprocess(decoded, output_type="np")
        cost = meter.take()
        return DenoiseStep(
            phase="decode", index=0, timing=timing, total=total, forward_passes=forward_passes, flops=cost.flops,
            bytes=cost.bytes, parts={"vae": vae_timing},
            shapes={"latents": tuple(latents.shape), "image": tuple(decoded.shape)},
            image=self.image_processor.numpy_to_pil(pixels)[0], pixels=pixels[0],
            notice=self.fast_path_report and self.fast_path_report.news(),
        )

    def decode_latents(self, latents):
        """Latents as the denoiser sees them -> the VAE's image in [-1, 1]."""
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]

    # -----------------------------------------------------------------------------------------
    # Set-up

    @contextlib.contextmanager
    def _stage(self, request):
        """Where every model call runs: no autograd, the request's attention kernel and adapter.
        Entered per stage and never held across a yield, so between events the caller's own
        choice holds, and another run of this pipeline sees its own adapter (or none)."""
        adapter = self.adapters.get(request.adapter) if request.adapter else None
        # an adapter's hooks wait for a background compile to finish tracing (fast_diffusion)
        tracing = self.fast_path_report.tracing if adapter and self.fast_path_report else contextlib.nullcontext()
        with torch.no_grad(), backends.use(attention=request.attention), tracing, \
                attached(self.adapter_components(), adapter, request.adapter_scale):
            yield

    def adapter_components(self) -> dict[str, torch.nn.Module]:
        """The models an adapter file names, by the prefix diffusers gives their weights."""
        components = {"unet" if self.is_unet else "transformer": self.denoiser}
        if self.text_encoder is not None:
            components["text_encoder"] = self.text_encoder
        return components

    def load_adapter(self, path_or_name: str, name: str | None = None) -> str:
        """Load a LoRA in diffusers' format (the folder or file save_lora_weights writes, or a
        shipped adapter's name); returns the name to pass as stream(adapter=). Attention layers it
        targets lose the fast path's fused projections (unfuse_adapter_targets)."""
        path = assets.resolve(path_or_name)
        name = name or Path(path_or_name).stem
        if not name or not name.strip():
            raise ValueError("an adapter needs a name; pass name=")
        self.adapters[name] = adapters.read_diffusers(path, self.adapter_components(), name)
        self.unfuse_adapter_targets()
        self.sync_precision(self.precision)  # re-weigh: unfused projections are read again
        return name

    def unfuse_adapter_targets(self):
        """Attention layers a loaded adapter targets go back to to_q / to_k / to_v: the fast path's
        fused projections would bypass the adapter's hooks (enable_fast_path calls this too)."""
        targeted = {f"{layer.component}.{layer.module}" for adapter in self.adapters.values() for layer in adapter.layers}
        for component, model in self.adapter_components().items():
            for module_name, module in model.named_modules():
                if isinstance(module, Attention) and getattr(module, "fused_projections", False) and any(
                    t.startswith(f"{component}.{module_name}.") for t in targeted
                ):
                    module.fused_projections = False  # the processor reads to_q / to_k / to_v again

    def sync_precision(self, precision: str | None):
        """Bring the linear layers of the denoiser and the text encoder, where the FLOPs are, to
        `precision` (None: their own dtype); the VAE is mostly convolutions and keeps its dtype."""
        backends.sync_precision([self.denoiser, self.text_encoder], precision)
        self.weight_bytes = component_weight_bytes(self.text_encoder, self.denoiser, self.vae)

    def make_scheduler(self, name: str | None):
        """A fresh scheduler: `name` from SCHEDULERS, or None for the pipeline's own, built on the
        pipeline's noise schedule (its scheduler config)."""
        if name is None:
            return type(self.scheduler).from_config(self.scheduler.config)
        scheduler_class, options = SCHEDULERS[name]
        return scheduler_class.from_config(self.scheduler.config, **options)

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


# ---------------------------------------------------------------------------------------------
# Helpers


def check_pipeline_config(config: dict) -> None:
    """Refuse the pipelines the loop does not fit, saying why."""
    name = config.get("_class_name", "this pipeline")
    if "text_encoder_2" in config:
        raise LoadError(f"{name} has two text encoders (SDXL-style), which the diffusion lane does not run yet")
    if "vae" not in config or ("unet" not in config and "transformer" not in config):
        raise LoadError(f"{name} is not a latent diffusion pipeline: the lane needs a VAE and a UNet or transformer")


def load_components(path, config: dict, dtype: torch.dtype, allow_pickle: bool) -> dict:
    """The components the lane runs, each loaded by the class model_index.json names, in `dtype`.

    The pipeline class itself is never loaded: it would load safety checkers and image processors
    the lane does not run (the safety checker alone is a 1.2 GB model, and the processors warn
    where torchvision is missing), and a cast after loading, which diffusers warns about."""
    parts = {}
    for name in RUN_COMPONENTS:
        spec = config.get(name)
        if not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        library, class_name = spec
        if library not in ("diffusers", "transformers"):
            raise LoadError(f"its {name} is {library}.{class_name}: the lane loads diffusers and transformers classes only")
        component_class = getattr(importlib.import_module(library), class_name)
        options = {}
        if issubclass(component_class, torch.nn.Module):
            # diffusers reads torch_dtype in every supported release; transformers 5 reads dtype
            options = {"torch_dtype" if library == "diffusers" else "dtype": dtype,
                       "use_safetensors": None if allow_pickle else True}
        parts[name] = component_class.from_pretrained(path, subfolder=name, **options)
    return parts


def class_names(id2label: dict | None) -> dict[str, int] | None:
    """A DiT pipeline's class names (id2label in model_index.json), each comma-separated name on
    its own, as DiTPipeline reads them."""
    if not id2label:
        return None
    return {name.strip(): int(key) for key, label in id2label.items() for name in label.split(",")}


def load_error(name_or_path, error) -> LoadError:
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
