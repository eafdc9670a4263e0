"""One call of the diffusion lane, checked: every bad value is refused here, with a message saying
what to give instead, before any work is done or any state changes.

    request = DiffusionRequest.checked(pipeline, prompt="red apple", steps=20, guidance_scale=5.0)

Depends on PIL, diffusers' schedulers (their names) and studio.values; never on a pipeline module (the
pipeline is read through the attributes named below) or Gradio.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from studio.values import is_integer, is_real, lone_surrogate

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
MAX_SIDE = 4096  # pixels per side; far past what any supported model was trained for
SEED_LIMIT = 2**64  # torch generators take seeds in [0, 2**64)


@dataclass(frozen=True)
class DiffusionRequest:
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    seed: int
    height: int
    width: int
    scheduler: str | None
    cfg_mode: str
    image: Image.Image | None
    strength: float
    preview: str | None
    vae_preview_every: int
    stop_event: threading.Event | None
    attention: str | None  # the backends of the run (None: auto / each model's own dtype)
    precision: str | None
    adapter: str | None  # the LoRA adapter of the run (None: the base model), and its weight
    adapter_scale: float

    @property
    def guided(self) -> bool:
        """guidance_scale 1.0 skips the unconditional pass: the formula reduces to the conditional."""
        return self.guidance_scale != 1.0

    @property
    def cancelled(self) -> bool:
        return self.stop_event is not None and self.stop_event.is_set()

    def preview_at(self, index: int) -> str | None:
        """The preview of denoising step `index`: a full VAE decode every vae_preview_every-th step."""
        every = self.vae_preview_every
        return "vae" if every and (index + 1) % every == 0 else self.preview

    @classmethod
    def checked(cls, pipeline, *, prompt, negative_prompt, steps, guidance_scale, seed, height, width, scheduler,
                cfg_mode, image, strength, preview, vae_preview_every, stop_event, attention, precision, adapter,
                adapter_scale):
        """The request, or a ValueError naming the bad value. `pipeline` supplies what the model
        allows: conditioning ("text" | "class"), class_id(), scheduler, size_multiple,
        vae_scale_factor, default_size and the adapters loaded."""
        if not isinstance(prompt, str):
            raise ValueError(
                f"the prompt must be a string (empty for an unconditional image); got {type(prompt).__name__}"
            )
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise ValueError(f"the negative prompt must be a string or None; got {type(negative_prompt).__name__}")
        for what, text in (("prompt", prompt), ("negative prompt", negative_prompt or "")):
            at = lone_surrogate(text)
            if at is not None:
                raise ValueError(f"the {what} holds a lone surrogate (U+{ord(text[at]):04X} at character {at}), half "
                                 "of a character, which is not valid Unicode; remove it")
        if pipeline.conditioning == "class":
            pipeline.class_id(prompt)
            pipeline.class_id(negative_prompt or "")
        limit = pipeline.scheduler.config.num_train_timesteps
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
        if adapter is not None and (not isinstance(adapter, str) or adapter not in pipeline.adapters):
            loaded = ", ".join(pipeline.adapters) or "none; load one with load_adapter(path)"
            raise ValueError(f"no adapter named {adapter!r} is loaded; loaded: {loaded}")
        if not is_real(adapter_scale) or not math.isfinite(adapter_scale):
            raise ValueError(f"adapter_scale must be a finite number (1.0: the adapter as trained); got {adapter_scale!r}")
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
                multiple = pipeline.size_multiple
                height, width = image.height // multiple * multiple, image.width // multiple * multiple
        height = pipeline.default_size[0] if height is None else height
        width = pipeline.default_size[1] if width is None else width
        multiple = pipeline.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not is_integer(value) or not 0 < value <= MAX_SIDE or value % multiple:
                raise ValueError(
                    f"{name} must be a multiple of {multiple} (the VAE's factor {pipeline.vae_scale_factor}"
                    f"{' times the patch size' if multiple != pipeline.vae_scale_factor else ''}) "
                    f"from {multiple} to {MAX_SIDE}; got {value!r}"
                )
        return cls(prompt, negative_prompt, steps, guidance_scale, seed, height, width, scheduler, cfg_mode, image,
                   strength, preview, vae_preview_every, stop_event, attention, precision, adapter,
                   float(adapter_scale))


def check_scheduler_name(name: str | None) -> None:
    if name is not None and (not isinstance(name, str) or name not in SCHEDULERS):
        raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
