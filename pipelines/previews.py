"""Cheap previews of latents: a linear map from latent channels to RGB, as ComfyUI and AUTOMATIC1111 show.

A diffusion step's noisy latent looks like noise; its prediction of the clean latent (x0) already
shows the picture. Decoding x0 with the VAE every step would cost about as much as a denoising
step, but a VAE's decoder is close to linear in colour: each latent channel pushes the pixels
above it towards some colour. So one [channels, 3] matrix plus a bias, applied pixel by pixel,
gives a blurry, small (latent-resolution) but faithful preview for almost nothing.

    factors = known_factors(vae) or fit_latent_rgb_factors(vae)
    preview = latents_to_preview(x0, factors)          # PIL image, latent resolution

The factors act on latents as the denoiser sees them (already multiplied by the VAE's
scaling_factor) and give RGB in [-1, 1], the VAE's own output range.

Depends on torch and Pillow only; the VAE is any object with `.decode(z).sample` and a
`.config.scaling_factor`, as diffusers' AutoencoderKL has. Never imports a pipeline or the UI.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class LatentRGBFactors:
    weights: tuple[tuple[float, float, float], ...]  # one (R, G, B) row per latent channel
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    source: str = ""  # where the numbers come from

    @property
    def channels(self) -> int:
        return len(self.weights)


# Published factors, from ComfyUI's comfy/latent_formats.py (classes SD15 and SDXL), where they were
# fitted on images decoded by the Stable Diffusion 1.x/2.x VAE and the SDXL VAE respectively.
SD15_FACTORS = LatentRGBFactors(
    weights=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    source="ComfyUI latent_formats.SD15 (Stable Diffusion 1.x/2.x VAE, scaling factor 0.18215)",
)
SDXL_FACTORS = LatentRGBFactors(
    weights=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
    source="ComfyUI latent_formats.SDXL (SDXL VAE, scaling factor 0.13025)",
)

# Both families share one architecture and differ in the latent scaling factor every checkpoint of
# the family uses; a VAE of another shape (a tiny one, say) with a default config of 0.18215 is
# not of the family, and gets fitted factors.
PUBLISHED_FACTORS = {0.18215: SD15_FACTORS, 0.13025: SDXL_FACTORS}
STABLE_DIFFUSION_VAE_BLOCKS = [128, 256, 512, 512]


def known_factors(vae) -> LatentRGBFactors | None:
    """The published factors for a VAE of the SD 1.x/2.x or SDXL family, None for any other."""
    config = vae.config
    if list(config.block_out_channels) != STABLE_DIFFUSION_VAE_BLOCKS or config.latent_channels != 4:
        return None
    return PUBLISHED_FACTORS.get(round(float(config.scaling_factor), 5))


def latents_to_preview(latents: torch.Tensor, factors: LatentRGBFactors) -> Image.Image:
    """The first latent of a [batch, channels, h, w] (or [channels, h, w]) tensor as an h x w RGB image."""
    if latents.ndim == 4:
        latents = latents[0]
    if latents.shape[0] != factors.channels:
        raise ValueError(
            f"these preview factors are for {factors.channels} latent channels, the latents have {latents.shape[0]}"
        )
    weights = torch.tensor(factors.weights, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(factors.bias, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents.float(), weights) + bias  # [h, w, 3] in about [-1, 1]
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(pixels.cpu().numpy())


def fit_latent_rgb_factors(vae, latents: torch.Tensor | None = None, *, count: int = 4, size: int = 16, seed: int = 0):
    """Fit the linear latent -> RGB map of any VAE by least squares.

    `latents` (scaled as the denoiser sees them) are decoded, each decoded image is averaged down
    to the latent grid, and [latent channels, 1] is regressed onto the RGB of the pixels above each
    latent. Real images' latents (vae.encode(images) times the scaling factor) give the best fit;
    without them `count` random latents of `size` x `size` are drawn from a generator of its own,
    so fitting never shifts anyone's seeded results.
    """
    config = vae.config
    parameter = next(vae.parameters())
    if latents is None:
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(count, config.latent_channels, size, size, generator=generator)
    latents = latents.to(parameter.device, parameter.dtype)
    with torch.no_grad():
        images = vae.decode(latents / config.scaling_factor).sample.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # a grayscale VAE (Fashion-MNIST): grey previews
    # Average the pixels above each latent, so both sides of the regression live on the latent grid.
    pixels = F.adaptive_avg_pool2d(images, latents.shape[-2:])
    inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu().double()
    targets = pixels.permute(0, 2, 3, 1).reshape(-1, 3).cpu().double()
    design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution  # [channels + 1, 3]
    weights = tuple(tuple(float(v) for v in row) for row in solution[:-1])
    bias = tuple(float(v) for v in solution[-1])
    return LatentRGBFactors(weights=weights, bias=bias, source=f"fitted on {len(latents)} decoded latents")

