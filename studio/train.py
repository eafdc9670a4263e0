"""Training the two shipped diffusion models from scratch, reproducibly, and measuring them.

    emoji-sd     a tiny Stable Diffusion (CLIP text encoder + UNet2DConditionModel + AutoencoderKL +
                 DDIM scheduler) on the single-codepoint emoji of Noto Color Emoji, captioned with
                 their lower-cased Unicode names, at 64x64 pixels
    fashion-dit  a tiny class-conditional DiT (DiTTransformer2DModel + AutoencoderKL + DDIM) on
                 Fashion-MNIST, prompted by class name

`studio train NAME` writes a stock diffusers folder to assets/NAME, records it in the manifest
next to it and draws its training curves into docs/models/; `studio evaluate NAME` measures it and
draws sample grids there. The data come from Debian packages (`apt-get install
fonts-noto-color-emoji dataset-fashion-mnist`), needed for training and evaluation only. Fixed step
counts and seeds on one CPU thread make a run repeatable; a GPU is used when there is one (faster,
not bit-identical).

Depends on torch, diffusers, transformers, tokenizers, PIL and numpy. Only the CLI imports it: the
lanes, the app and the tests use the shipped weights, never the training data.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import re
import time
import unicodedata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from studio import assets

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# DiTPipeline splits a label on commas, so both "t-shirt" and "top" name class 0.
FASHION_CLASSES = ["t-shirt, top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DOCS = Path(__file__).resolve().parent.parent / "docs" / "models"
DEFAULT_GUIDANCE = 5.0  # the diffusion lane's default guidance_scale

# Single-codepoint emoji live in these blocks; ASCII digits and '#' are in the font only as keycap bases.
EMOJI_RANGES = [(0x00A0, 0x3300), (0x1F000, 0x1FB00)]
EMOJI_CAPTION_TOKENS = 32  # a name is at most 13 tokens with <start> and <end>; keyword lists up to 26
EMOJI_COUNT = 256
CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
SYMBOLA_FONT = Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf")
FONT_PACKAGES = {EMOJI_FONT: "fonts-noto-color-emoji", SYMBOLA_FONT: "fonts-symbola"}
# Prompts named in the issue and a few more, for the sample grid; always in the training set.
EMOJI_SHOWCASE = ["red apple", "rocket", "smiling face with heart-shaped eyes", "dog face", "slice of pizza",
                  "snowman without snow", "sun with face", "hot beverage", "rainbow", "ghost"]


# ---------------------------------------------------------------------------------------------
# Data


def emoji_glyphs(font_path: Path = EMOJI_FONT, size: int = 64, codepoints: list[int] | None = None
                 ) -> tuple[torch.Tensor, list[str]]:
    """The single-codepoint emoji the font draws (all of them, or those of `codepoints`), as
    [N, 3, size, size] in [-1, 1] on white, each with its Unicode name in lower case."""
    if not font_path.is_file():
        raise FileNotFoundError(f"{font_path} is missing: apt-get install {FONT_PACKAGES.get(font_path, 'its font')}")
    # Noto Color Emoji is a bitmap font whose only size is 109; an outline font (Symbola) draws at any.
    font = ImageFont.truetype(str(font_path), 109)
    wanted = codepoints or [c for first, last in EMOJI_RANGES for c in range(first, last)]
    images, captions = [], []
    for codepoint in wanted:
        char = chr(codepoint)
        name = unicodedata.name(char, None)
        if name is None or unicodedata.category(char) in ("Mn", "Me", "Cf"):
            continue  # combining marks and joiners only exist inside sequences
        glyph = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((0, 0), char, font=font, embedded_color=True, fill=(0, 0, 0, 255))
        box = glyph.getbbox()
        if box is None:
            continue  # not in the font
        # Centre the glyph's ink on a white square, keeping the font's own scale between emoji.
        canvas = Image.new("RGBA", (136, 136), (255, 255, 255, 255))
        ink = glyph.crop(box)
        canvas.alpha_composite(ink, ((136 - ink.width) // 2, (136 - ink.height) // 2))
        pixels = np.asarray(canvas.convert("RGB").resize((size, size), Image.LANCZOS))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        captions.append(name.lower())
    return torch.stack(images).float() / 127.5 - 1, captions


def cldr_keywords(path: Path = CLDR_ANNOTATIONS) -> dict[str, list[str]]:
    """Each emoji's English CLDR keywords ("red apple" -> apple, fruit, red), its short name last."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install unicode-cldr-core")
    keywords: dict[str, list[str]] = {}
    for match in re.finditer(r'<annotation cp="([^"]+)"( type="tts")?>([^<]+)</annotation>', path.read_text()):
        char, tts, text = match.groups()
        if tts:
            keywords.setdefault(char, []).append(text)
        else:
            keywords[char] = [k.strip() for k in text.split("|")] + keywords.get(char, [])
    return {char: list(dict.fromkeys(words)) for char, words in keywords.items()}


def emoji_subset(count: int = EMOJI_COUNT) -> list[int]:
    """The codepoints emoji-sd is trained on: the showcase emoji, then pictographs (U+1F300 on:
    animals, food, objects, faces) that have CLDR keywords, drawn with a fixed seed up to `count`.
    Fewer emoji than the font's 1,392 is what lets a 3 M-parameter UNet learn each one well in an
    hour of CPU."""
    keywords = cldr_keywords()
    named = {unicodedata.name(chr(c), "").lower(): c for first, last in EMOJI_RANGES for c in range(first, last)}
    showcase = [named[caption] for caption in EMOJI_SHOWCASE]
    pool = [c for c in range(0x1F300, 0x1FB00)
            if chr(c) in keywords and unicodedata.name(chr(c), None) and c not in showcase
            and unicodedata.category(chr(c)) != "Sk"]  # skin-tone modifiers draw as plain swatches
    _, drawn = emoji_glyphs(codepoints=pool)  # only those the font draws
    drawn_codepoints = [named[caption] for caption in drawn]
    order = torch.randperm(len(drawn_codepoints), generator=torch.Generator().manual_seed(0)).tolist()
    return sorted(showcase + [drawn_codepoints[i] for i in order[:count - len(showcase)]])


def emoji_dataset(count: int = EMOJI_COUNT, font_path: Path = EMOJI_FONT
                  ) -> tuple[torch.Tensor, list[str], list[list[str]]]:
    """The training set: emoji_subset()'s renders, their Unicode names and their CLDR keywords."""
    codepoints = emoji_subset(count)
    images, captions = emoji_glyphs(font_path, codepoints=codepoints)
    keywords = cldr_keywords()
    return images, captions, [[k.lower() for k in keywords[chr(c)]] for c in codepoints]


def keyword_prompt(name: str, keywords: list[str]) -> str:
    """An emoji asked for in other words than its training name: its CLDR keywords, comma-separated,
    without those that merely repeat the name."""
    return ", ".join(k for k in keywords if k != name)


def fashion_mnist(split: str = "train", folder: Path = FASHION_MNIST) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST padded from 28x28 to 32x32 (the DiT's patches need a size divisible by 8),
    as [N, 1, 32, 32] in [-1, 1], with the class indices."""
    prefix = "train" if split == "train" else "t10k"
    images_file = folder / f"{prefix}-images-idx3-ubyte.gz"
    if not images_file.is_file():
        raise FileNotFoundError(f"{images_file} is missing: apt-get install dataset-fashion-mnist")
    # The idx format: a 16-byte header before the images, an 8-byte one before the labels.
    images = np.frombuffer(gzip.open(images_file).read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    labels = np.frombuffer(gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    images = F.pad(torch.from_numpy(images.copy()).float() / 127.5 - 1, (2, 2, 2, 2), value=-1.0)
    return images, torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------
# The models, each as small as still learns its data


def build_tokenizer(captions: list[str], max_length: int):
    """A CLIP tokenizer whose byte-level BPE is learned from the captions until every caption word
    is one token; any other text still encodes, byte by byte."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer()  # an empty one, for CLIP's own normaliser and pre-tokeniser
    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = clip.backend_tokenizer.normalizer
    bpe.pre_tokenizer = clip.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        special_tokens=["<|startoftext|>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(captions, trainer)
    learned = json.loads(bpe.to_str())["model"]
    return CLIPTokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]], model_max_length=max_length)


def emoji_models(vocab_size: int, max_length: int, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    # 64x64x3 pixels <-> 16x16x4 latents (factor 4, not Stable Diffusion's 8: at 64 pixels an
    # 8x8 latent loses the emoji's details). No attention in the VAE: convolutions suffice here.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16, mid_block_add_attention=False,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    # Attention over the text tokens only where the latent is 4x4 (cross-attention at 16x16 costs
    # most of the compute and buys little at this size); the pooled caption also enters every
    # ResNet block through the time embedding (addition_embed_type="text").
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=128, attention_head_dim=32, norm_num_groups=32,
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )
    return vae, text_encoder, unet


def fashion_models():
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    # 32x32x1 pixels <-> 8x8x4 latents; the DiT cuts the latent into 2x2 patches: 16 tokens.
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=16, mid_block_add_attention=False,
    )
    # num_embeds_ada_norm=1000: the stock DiTPipeline hard-codes label 1000 as "no class" (ImageNet's
    # size), so the label table needs 1001 rows although only 0-9 and 1000 are ever used.
    transformer = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=6,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )
    return vae, transformer


def ddim_scheduler(beta_schedule: str, beta_start: float, beta_end: float):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


# ---------------------------------------------------------------------------------------------
# Training


def fit(modules, batch_loss, steps: int, lr: float, name: str, generator, checkpoint: Path,
        ema_decay: float | None = None, warmup: int = 200, every: int = 200):
    """AdamW with a linear warm-up and gradient clipping; returns the loss curve and, with ema_decay,
    an exponential moving average of the modules (what diffusion models sample best with).

    Every `every` steps the whole state, random generators included, goes to `checkpoint`; a run
    that finds one there continues from it exactly as if it had never stopped.
    """
    parameters = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    ema = [copy.deepcopy(m).requires_grad_(False) for m in modules] if ema_decay else []
    curve, first, start = [], 0, time.perf_counter()
    if checkpoint.exists():
        # weights_only: the checkpoint is read back as tensors and numbers, never as code.
        state = torch.load(checkpoint, weights_only=True)
        for module, weights in zip(modules + ema, state["modules"]):
            module.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        curve, first = state["curve"], state["step"]
        print(f"{name}: resuming at step {first} from {checkpoint}", flush=True)
    for step in range(first, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        curve.append(loss.item())
        if ema:
            decay = min(ema_decay, (1 + step) / (10 + step))  # average from the start, not from noise
            with torch.no_grad():
                for average, module in zip(ema, modules):
                    torch._foreach_lerp_(list(average.parameters()), list(module.parameters()), 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            recent = sum(curve[-100:]) / len(curve[-100:])
            print(f"{name} step {step + 1}/{steps}  loss {recent:.4f}  {time.perf_counter() - start:.0f} s", flush=True)
        if (step + 1) % every == 0 or step == steps - 1:
            state = {"modules": [m.state_dict() for m in modules + ema], "optimizer": optimizer.state_dict(),
                     "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "curve": curve,
                     "step": step + 1}
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, checkpoint.with_suffix(".tmp"))
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: a kill mid-save keeps the last one
    return curve, ema or modules


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, crop: int, generator, checkpoint: Path) -> list[float]:
    """Reconstruction (L1) plus Stable Diffusion's tiny KL term (weight 1e-6), on random crops: the
    VAE is convolutional, so crops teach it the same local job at a fraction of the cost."""
    vae.train()

    def batch_loss():
        index = torch.randint(len(images), (batch_size,), generator=generator)
        top, left = torch.randint(images.shape[-1] - crop + 1, (2,), generator=generator).tolist()
        batch = images[index, :, top:top + crop, left:left + crop].to(vae.device)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        return F.l1_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()

    curve, _ = fit([vae], batch_loss, steps, lr=1e-3, name="vae", generator=generator, checkpoint=checkpoint)
    vae.eval()
    return curve


@torch.no_grad()
def latent_means(vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The VAE's latent means of `images`, unscaled."""
    return torch.cat([vae.encode(images[i:i + batch_size].to(vae.device)).latent_dist.mode().cpu()
                      for i in range(0, len(images), batch_size)])


def scaled_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The training latents, with the VAE's scaling_factor set so that they have unit std (the
    noise schedule assumes it)."""
    latents = latent_means(vae, images)
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return latents * vae.config.scaling_factor


def noised(latents: torch.Tensor, scheduler, generator, device):
    """A batch of latents noised to random timesteps, the noise, and the min-SNR loss weights
    (Hang et al. 2023: capping the weight of the easy, low-noise steps speeds training up)."""
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=5.0) / snr
    return (scheduler.add_noise(latents, noise, timesteps).to(device), noise.to(device), timesteps.to(device),
            weights.to(device))


def weighted_mse(prediction, target, weights):
    return (weights * (prediction - target).pow(2).mean(dim=(1, 2, 3))).mean()


def train_emoji(out: Path, vae_steps: int, unet_steps: int, device: torch.device, work: Path, seed: int = 0) -> dict:
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # The VAE learns from every emoji the font draws (it only compresses pixels, and more shapes make
    # it general); the UNet and text encoder learn emoji_subset()'s, each by name and by keywords.
    all_images, _ = emoji_glyphs()
    images, names, keywords = emoji_dataset()
    phrasings = [[name, *words] for name, words in zip(names, keywords)]
    tokenizer = build_tokenizer([p for ps in phrasings for p in ps], EMOJI_CAPTION_TOKENS)
    vae, text_encoder, unet = (m.to(device) for m in emoji_models(len(tokenizer), EMOJI_CAPTION_TOKENS, tokenizer))
    print(f"emoji-sd: {len(names)} emoji ({len(all_images)} for the VAE), vocabulary {len(tokenizer)}", flush=True)

    vae_curve = train_vae(vae, all_images, vae_steps, batch_size=32, crop=32, generator=generator,
                          checkpoint=work / "vae.pt")
    latents = scaled_latents(vae, images)
    scheduler = ddim_scheduler("scaled_linear", 0.00085, 0.012)

    def caption(index: int) -> str:
        """Half the time the Unicode name; else one to three of its keywords, shuffled; and one
        caption in ten dropped, for the unconditional model classifier-free guidance needs."""
        draw = torch.rand(2, generator=generator).tolist()
        if draw[0] < 0.1:
            return ""
        if draw[1] < 0.5:
            return names[index]
        words = keywords[index]
        chosen = torch.randperm(len(words), generator=generator)[:1 + int(draw[1] * 6) % 3].tolist()
        return ", ".join(words[i] for i in chosen)

    def batch_loss():
        index = torch.randint(len(latents), (32,), generator=generator)
        ids = tokenizer([caption(i) for i in index.tolist()], padding="max_length", truncation=True,
                        max_length=EMOJI_CAPTION_TOKENS, return_tensors="pt").input_ids.to(device)
        noisy, noise, timesteps, weights = noised(latents[index], scheduler, generator, device)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        return weighted_mse(prediction, noise, weights)

    text_encoder.train()
    unet.train()
    unet_curve, (text_encoder, unet) = fit([text_encoder, unet], batch_loss, unet_steps, lr=5e-4, name="unet",
                                            generator=generator, checkpoint=work / "unet.pt", ema_decay=0.999)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    save(pipeline.to("cpu"), out)
    parameters = sum(p.numel() for m in (vae, text_encoder, unet) for p in m.parameters())
    record_in_manifest(
        "emoji-sd", out, parameters=parameters,
        architecture="StableDiffusionPipeline: CLIPTextModel (3 layers, width 128) + UNet2DConditionModel "
                     "(32-64-128 channels, cross-attention at 4x4) + AutoencoderKL (64x64x3 <-> 16x16x4) + DDIM",
        training_data=f"{len(names)} single-codepoint emoji rendered from Noto Color Emoji at 64x64, captioned "
                      f"with their lower-cased Unicode names and English CLDR keywords (the VAE: all "
                      f"{len(all_images)} the font draws)",
        training_data_license="OFL-1.1 (Noto Color Emoji font, Debian package fonts-noto-color-emoji); "
                              "Unicode License v3 (CLDR annotations, Debian package unicode-cldr-core)",
        source=f"trained from scratch by `studio train emoji-sd` ({vae_steps} VAE steps, {unet_steps} UNet steps, "
               f"seed {seed})",
        example_prompt="red apple", example_prompts=["rocket", "dog face", "slice of pizza", "rainbow", "grinning face"],
    )
    return {"vae": vae_curve, "unet": unet_curve}


def train_fashion(out: Path, vae_steps: int, dit_steps: int, device: torch.device, work: Path, seed: int = 0) -> dict:
    from diffusers import DiTPipeline

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = fashion_mnist("train")
    vae, transformer = (m.to(device) for m in fashion_models())
    vae_curve = train_vae(vae, images, vae_steps, batch_size=64, crop=32, generator=generator, checkpoint=work / "vae.pt")
    latents = scaled_latents(vae, images)
    scheduler = ddim_scheduler("linear", 0.0001, 0.02)

    def batch_loss():
        index = torch.randint(len(latents), (64,), generator=generator)
        noisy, noise, timesteps, weights = noised(latents[index], scheduler, generator, device)
        # In training mode the DiT's label embedding itself drops one label in ten to "no class"
        # (class_dropout_prob=0.1), which is what classifier-free guidance needs.
        prediction = transformer(noisy, timestep=timesteps, class_labels=labels[index].to(device)).sample
        return weighted_mse(prediction, noise, weights)

    transformer.train()
    dit_curve, (transformer,) = fit([transformer], batch_loss, dit_steps, lr=5e-4, name="dit", generator=generator,
                                    checkpoint=work / "dit.pt", ema_decay=0.999)
    with torch.no_grad():
        # Rows 10-999 of each label table are never used (see fashion_models); zeroing them says so,
        # and the file compresses well in git.
        for block in transformer.transformer_blocks:
            block.norm1.emb.class_embedder.embedding_table.weight[len(FASHION_CLASSES):1000] = 0
    id2label = dict(enumerate(FASHION_CLASSES))
    pipeline = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler, id2label=id2label)
    pipeline.register_to_config(id2label=id2label)  # DiTPipeline does not, and from_pretrained reads it there
    save(pipeline.to("cpu"), out)
    parameters = sum(p.numel() for m in (vae, transformer) for p in m.parameters())
    record_in_manifest(
        "fashion-dit", out, parameters=parameters,
        architecture="DiTPipeline: DiTTransformer2DModel (6 layers, width 128, 2x2 patches of an 8x8x4 latent, "
                     "class-conditional) + AutoencoderKL (32x32x1 <-> 8x8x4) + DDIM",
        training_data="Fashion-MNIST: 60,000 training images of 10 clothing classes, padded to 32x32",
        training_data_license="MIT (Zalando Research, Debian package dataset-fashion-mnist)",
        source=f"trained from scratch by `studio train fashion-dit` ({vae_steps} VAE steps, {dit_steps} DiT steps, "
               f"seed {seed})",
        example_prompt="sneaker", example_prompts=["dress", "bag", "ankle boot", "trouser", "pullover"],
    )
    return {"vae": vae_curve, "dit": dit_curve}


def save(pipeline, out: Path) -> None:
    """Write a stock diffusers folder (safetensors, model_index.json), replacing an older one."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    pipeline.save_pretrained(out, safe_serialization=True)
    tokenizer = getattr(pipeline, "tokenizer", None)
    if tokenizer is not None:
        # tokenizer.json is what transformers 5 reads; vocab.json and merges.txt are CLIP's own
        # format, for older transformers and other CLIP tokenizers.
        bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
        (out / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
        merges = "".join(f"{left} {right}\n" for left, right in bpe["merges"])
        (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + merges)


def record_in_manifest(name: str, folder: Path, **fields) -> None:
    """Add or replace `name`, with the folder's files and their sha256, in the manifest.json next to
    the folder (assets/manifest.json for the shipped models)."""
    files = [{"path": p.relative_to(folder).as_posix(), "sha256": assets.sha256_of(p), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file()]
    entry = {"name": name, "kind": "diffusion", "license": "Apache-2.0", "format": "diffusers", **fields,
             "folder": folder.name, "files": files, "restore": f"git checkout -- assets/{folder.name}"}
    path = folder.parent / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {"models": []}
    manifest["models"] = [m for m in manifest["models"] if m["name"] != name] + [entry]
    path.write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Measuring


@torch.no_grad()
def evaluate_emoji(folder: Path, prompts: int = 100, steps: int = 20, seed: int = 0) -> dict:
    """For a fixed sample of the training emoji (drawn with seed 1234), prompted once by name and once
    by keywords: is the training image nearest to each generated image, in pixels and in latents,
    the prompted emoji? The judge is the plainest image feature there is: Euclidean distance
    between 64x64 RGB images (and between 16x16x4 latents), against all the training emoji."""
    from diffusers import StableDiffusionPipeline

    images, names, keywords = emoji_dataset()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.vae.config.scaling_factor
    train_latents = latent_means(pipe.vae, images) * scale
    chosen = torch.randperm(len(names), generator=torch.Generator().manual_seed(1234))[:prompts]
    showcase = torch.tensor([names.index(c) for c in EMOJI_SHOWCASE])
    by_keywords = [keyword_prompt(names[i], keywords[i]) for i in chosen.tolist()]
    results = {"emoji": len(names), "prompts": [names[i] for i in chosen], "keyword_prompts": by_keywords,
               "steps": steps, "vae_round_trip_error": pixel_error(round_trip(pipe.vae, images), images)}

    def generate(texts: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        latents = torch.cat([
            pipe(batch, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                 generator=torch.Generator().manual_seed(seed + n)).images
            for n, batch in enumerate(texts[i:i + 25] for i in range(0, len(texts), 25))
        ])
        return latents, pipe.vae.decode(latents / scale).sample.clamp(-1, 1)

    for guidance in (DEFAULT_GUIDANCE, 1.0):
        latents, generated = generate([names[i] for i in chosen.tolist() + showcase.tolist()], guidance)
        pixel_hits = nearest(generated[:prompts], images) == chosen
        latent_hits = nearest(latents[:prompts], train_latents) == chosen
        _, by_keyword_images = generate(by_keywords, guidance)
        keyword_hits = nearest(by_keyword_images, images) == chosen
        results[f"guidance {guidance:g}"] = {
            "nearest_is_prompted_pixels": pixel_hits.float().mean().item(),
            "nearest_is_prompted_latents": latent_hits.float().mean().item(),
            "nearest_is_prompted_pixels_by_keywords": keyword_hits.float().mean().item(),
            "missed_pixels": [names[i] for i, hit in zip(chosen.tolist(), pixel_hits) if not hit],
        }
        print(f"emoji-sd guidance {guidance:g}: nearest is prompted {pixel_hits.float().mean():.0%} (pixels), "
              f"{latent_hits.float().mean():.0%} (latents); by keywords {keyword_hits.float().mean():.0%} (pixels)",
              flush=True)
        # Rows in pairs: the training images, then what their names (and, last, keywords) generated.
        pairs = [images[showcase], generated[prompts:], images[chosen[:10]], generated[:10],
                 images[chosen[10:20]], generated[10:20], by_keyword_images[10:20]]
        save_grid(torch.cat(pairs), 10, DOCS / f"emoji-sd-samples-guidance-{guidance:g}.png", scale=2)
    return results


def nearest(queries: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Index of the nearest reference (Euclidean) to each query."""
    return torch.cdist(queries.flatten(1), references.flatten(1)).argmin(dim=1)


def train_fashion_classifier(seed: int = 0, epochs: int = 2):
    """A small CNN on the real Fashion-MNIST training set: the judge of the generated images.
    Returns it with its accuracy on the real test set."""
    torch.manual_seed(seed)
    images, labels = fashion_mnist("train")
    classifier = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 16, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )
    optimizer = torch.optim.Adam(classifier.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(128):
            loss = F.cross_entropy(classifier(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    test_images, test_labels = fashion_mnist("test")
    return classifier, (classify(classifier, test_images) == test_labels).float().mean().item()


@torch.no_grad()
def classify(classifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([classifier(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])


@torch.no_grad()
def round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """Images encoded and decoded by the VAE: the best any generated image can look."""
    return torch.cat([vae.decode(latents).sample.clamp(-1, 1) for latents in latent_means(vae, images).split(64)])


def pixel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference in 0-255 pixel levels."""
    return ((a - b).abs().mean() * 127.5).item()


def evaluate_fashion(folder: Path, per_class: int = 100, steps: int = 25, seed: int = 0) -> dict:
    """Generate per_class images of each class; how often does a classifier trained on real
    Fashion-MNIST name the prompted class?"""
    from diffusers import DiTPipeline

    classifier, test_accuracy = train_fashion_classifier()
    print(f"fashion classifier: {test_accuracy:.2%} on the real test set", flush=True)
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    test_images, test_labels = (part[:2000] for part in fashion_mnist("test"))
    decoded = round_trip(pipe.vae, test_images)
    results = {"classifier_test_accuracy": test_accuracy, "samples_per_class": per_class, "steps": steps,
               "vae_round_trip_error": pixel_error(decoded, test_images),
               "classifier_accuracy_on_vae_round_trips":
                   (classify(classifier, decoded) == test_labels).float().mean().item()}
    for guidance in (DEFAULT_GUIDANCE, 1.0):
        generated, wanted = [], []
        for label in range(len(FASHION_CLASSES)):
            out = pipe([label] * per_class, guidance_scale=guidance, num_inference_steps=steps, output_type="pt",
                       generator=torch.Generator().manual_seed(seed + label))
            generated.append(out.images * 2 - 1)  # the pipeline returns [0, 1]; the classifier saw [-1, 1]
            wanted += [label] * per_class
        generated, wanted = torch.cat(generated), torch.tensor(wanted)
        hits = classify(classifier, generated) == wanted
        per = {FASHION_CLASSES[c]: hits[wanted == c].float().mean().item() for c in range(len(FASHION_CLASSES))}
        results[f"guidance {guidance}"] = {"classified_as_prompted": hits.float().mean().item(), "per_class": per}
        print(f"fashion-dit guidance {guidance}: {hits.float().mean():.2%} classified as prompted", flush=True)
        rows = [generated[wanted == c][:10] for c in range(len(FASHION_CLASSES))]
        save_grid(torch.cat(rows), 10, DOCS / f"fashion-dit-samples-guidance-{guidance:g}.png", scale=2)
    return results


# ---------------------------------------------------------------------------------------------
# Pictures for docs/models.md


def save_grid(images: torch.Tensor, columns: int, path: Path, scale: int = 1) -> None:
    """Images in [-1, 1], [N, C, H, W], as one PNG grid."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    count, height, width, channels = pixels.shape
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + 2), columns * (width + 2), channels), 255, np.uint8)
    for i, image in enumerate(pixels):
        top, left = (i // columns) * (height + 2) + 1, (i % columns) * (width + 2) + 1
        grid[top:top + height, left:left + width] = image
    picture = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


def plot_curves(curves: dict[str, list[float]], path: Path, title: str, smooth: int = 50) -> None:
    """Each loss curve (moving average over `smooth` steps, log scale) in its own panel."""
    panels = []
    for name, curve in curves.items():
        values = np.convolve(np.asarray(curve), np.ones(smooth) / smooth, mode="valid")
        logs = np.log10(values)
        low, high = logs.min(), logs.max()
        width, height, margin = 420, 220, 50
        panel = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(panel)
        draw.rectangle([margin, 20, width - 10, height - 30], outline="black")
        xs = margin + np.arange(len(logs)) / max(len(logs) - 1, 1) * (width - 10 - margin)
        ys = 20 + (high - logs) / max(high - low, 1e-9) * (height - 50)
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(30, 90, 200), width=2)
        draw.text((margin, 4), f"{title}: {name} loss (log scale, {smooth}-step mean)", fill="black")
        draw.text((2, 20), f"{10 ** high:.3g}", fill="black")
        draw.text((2, height - 40), f"{10 ** low:.3g}", fill="black")
        draw.text((margin, height - 24), "step 0", fill="black")
        draw.text((width - 80, height - 24), f"step {len(curve)}", fill="black")
        panels.append(panel)
    figure = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * panel.width, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)


# ---------------------------------------------------------------------------------------------
# The `studio train` and `studio evaluate` commands

# Step counts of the shipped models: about 10 (fashion-dit) and 60 (emoji-sd) minutes on one CPU thread.
STEPS = {"emoji-sd": {"vae_steps": 1500, "unet_steps": 10000}, "fashion-dit": {"vae_steps": 500, "dit_steps": 3000}}


def train(name: str, out: Path | None = None, resume: bool = False, **steps) -> None:
    """Train `name` into `out` (default assets/NAME). Checkpoints go to the cache and are removed
    once the model is saved; resume=True continues from them (also to train on for more steps)."""
    import shutil

    out = out or assets.MANIFEST.parent / name
    steps = {k: v for k, v in steps.items() if v is not None}
    if set(steps) - set(STEPS[name]):
        unknown = ", ".join(sorted(set(steps) - set(STEPS[name])))
        raise ValueError(f"{name} has no {unknown}; it takes {', '.join(STEPS[name])}")
    steps = {**STEPS[name], **steps}
    work = assets.cache_dir() / "training" / name
    if work.exists() and not resume:
        # Hours of training may be in there: never thrown away without being asked.
        raise ValueError(f"{work} holds an unfinished run's checkpoints: pass --resume to continue it, "
                         "or delete the folder to start afresh")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    curves = (train_emoji if name == "emoji-sd" else train_fashion)(out, device=device, work=work, **steps)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{name}-training.json").write_text(json.dumps(curves))
    plot_curves(curves, DOCS / f"{name}-training.png", name)
    shutil.rmtree(work)


def evaluate(name: str, folder: Path | None = None) -> None:
    folder = folder or Path(assets.resolve(name))
    results = (evaluate_emoji if name == "emoji-sd" else evaluate_fashion)(folder)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{name}-metrics.json").write_text(json.dumps(results, indent=2) + "\n")
