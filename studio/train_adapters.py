"""Training the shipped LoRA adapters, one per lane, and measuring what each changes.

    emoji-describer   for smollm2-135m: writes an emoji's CLDR keywords after its name ("hot
                      beverage:" -> " beverage, coffee, tea, drink"); trained on the English CLDR
                      annotations (Debian unicode-cldr-core) with general English replayed beside
                      them, measured by held-out perplexity on the annotations and on general English
                      never trained on: the GPL-3 text Debian ships, and Python's reference documentation
    symbola-outline   for emoji-sd: draws an emoji in the black outline style of the Symbola font
                      (Debian fonts-symbola) instead of Noto's colour; measured by a nearest-neighbour
                      judge between the Symbola and the Noto render of each prompted emoji

`studio train NAME` writes a peft / diffusers LoRA folder to assets/NAME and records it in the
manifest; `studio evaluate NAME` measures it into docs/models/NAME-metrics.json. Training uses
peft (the `train` extra); the lanes read the files without it.

Depends on torch, transformers, diffusers, peft and the studio core; only the CLI imports it.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

from studio import assets
from studio import train as base_training
from studio.train import (
    CLDR_ANNOTATIONS,
    DEFAULT_GUIDANCE,
    DOCS,
    SYMBOLA_FONT,
    record_in_manifest,
)

GENERAL_TEXT = Path("/usr/share/common-licenses/GPL-3")  # measured on, never trained on
# general English replayed during training, so that the adapter learns its domain without
# forgetting the rest: other licenses Debian ships (not the GPL family, which GPL-3 belongs to)
REPLAY_TEXTS = [Path("/usr/share/common-licenses") / name for name in ("Apache-2.0", "MPL-2.0", "Artistic", "GFDL-1.3")]
STEPS = {"emoji-describer": 300, "symbola-outline": 3000}
BASES = {"emoji-describer": "smollm2-135m", "symbola-outline": "emoji-sd"}


# ---------------------------------------------------------------------------------------------
# emoji-describer (the LLM lane)


def emoji_lines(path: Path = CLDR_ANNOTATIONS) -> list[str]:
    """One line per emoji of the English CLDR annotations: "<short name>: <other keywords>"."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: apt-get install unicode-cldr-core")
    names, keywords = {}, {}
    for match in re.finditer(r'<annotation cp="([^"]+)"( type="tts")?>([^<]+)</annotation>', path.read_text()):
        char, tts, text = match.groups()
        if not any(ord(c) > 0x2000 for c in char):  # the file also annotates ASCII punctuation
            continue
        if tts:
            names[char] = text
        else:
            keywords[char] = [k.strip() for k in text.split("|")]
    lines = {}
    for char, name in names.items():
        others = [k for k in keywords.get(char, []) if k != name]
        if others:  # the same name (skin tones, say) keeps its first annotation
            lines.setdefault(name, f"{name}: {', '.join(others)}\n")
    return list(lines.values())


def split(items: list, every: int = 10) -> tuple[list, list]:
    """Every `every`-th item held out for measuring, the rest for training."""
    return [x for i, x in enumerate(items) if i % every], [x for i, x in enumerate(items) if not i % every]


def general_windows(tokenizer, files: list[Path], length: int = 128) -> list[list[int]]:
    """General English (Debian's license texts) as windows of `length` tokens."""
    windows = []
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing (it comes with Debian's base-files)")
        windows += windows_of(tokenizer, file.read_text(), length)
    return windows


def windows_of(tokenizer, text: str, length: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i:i + length] for i in range(0, len(ids) - length, length)]


def documentation_windows(tokenizer, held_out: bool, length: int = 128, count: int = 200) -> list[list[int]]:
    """General English prose: Python's own reference documentation (`pydoc_data`, in every
    Python), alternate topics for training (replayed) and for measuring (held out), `count`
    windows of the chosen half."""
    from pydoc_data.topics import topics

    names = sorted(topics)[int(held_out)::2]
    return windows_of(tokenizer, "\n\n".join(topics[name] for name in names), length)[:count]


@torch.no_grad()
def perplexity(model, sequences: list[list[int]], batch_size: int = 16) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of `sequences`."""
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i:i + batch_size]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + int((targets != -100).sum())
    return math.exp(total / count)


def train_emoji_describer(out: Path, steps: int, seed: int = 0) -> dict:
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    from pipelines.text_generation import TextGenerationPipeline

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    llm = TextGenerationPipeline.from_pretrained(BASES["emoji-describer"], device="cpu", dtype="fp32")
    tokenizer = llm.tokenizer
    train_lines, _ = split(emoji_lines())
    encoded = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in train_lines]
    replay = general_windows(tokenizer, REPLAY_TEXTS, length=48)
    replay += documentation_windows(tokenizer, held_out=False, length=48, count=len(replay))
    # the attention projections of every block, rank 8: 1.8 M parameters, 1.4 % of the model
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    # peft's layers injected straight into the model (PeftModel's wrapper would add nothing here)
    model = inject_adapter_in_model(config, llm.model)
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in parameter_name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    curve, started = [], time.perf_counter()
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # warm up, then cosine down to a tenth
            group["lr"] = 3e-4 * min(1.0, (step + 1) / 30) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        # eight annotation lines and eight windows of general English in every batch
        batch = [encoded[i] for i in torch.randint(len(encoded), (8,), generator=generator).tolist()]
        batch += [replay[i] for i in torch.randint(len(replay), (8,), generator=generator).tolist()]
        width = max(len(s) for s in batch)
        ids = torch.tensor([s + [tokenizer.pad_token_id or 0] * (width - len(s)) for s in batch])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch])
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"emoji-describer step {step + 1}/{steps}  loss {sum(curve[-25:]) / len(curve[-25:]):.3f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    model.eval()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    # the folder PeftModel.save_pretrained writes: its config, and the LoRA weights under peft's prefix
    config.save_pretrained(out)
    weights = {f"base_model.model.{key}": value.contiguous() for key, value in get_peft_model_state_dict(model).items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    parameters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    record_in_manifest(
        "emoji-describer", out, kind="llm-adapter", base=BASES["emoji-describer"], parameters=parameters,
        architecture="LoRA rank 8 (alpha 16) on q/k/v/o of all 30 blocks of SmolLM2-135M",
        training_data=f"{len(train_lines)} of the {len(train_lines) + len(split(emoji_lines())[1])} English CLDR emoji "
                      "annotations, one line each: '<name>: <keywords>' (every tenth held out), with general English "
                      "replayed beside them: Debian's Apache-2.0, MPL-2.0, Artistic and GFDL-1.3 license texts and "
                      "half the topics of Python's reference documentation (pydoc_data)",
        training_data_license="Unicode License v3 (CLDR annotations, Debian package unicode-cldr-core); the license "
                              "texts' own terms (Debian package base-files); PSF License (Python's documentation)",
        source=f"trained by `studio train emoji-describer` ({steps} steps, batch 8 + 8 replayed, seed {seed})",
        format="peft", example_prompt="hot beverage:",
    )
    return {"loss": curve, "seconds": time.perf_counter() - started}


def evaluate_emoji_describer(folder: Path) -> dict:
    """Held-out perplexity of the base model and with the adapter: on the held-out annotations (the
    domain) and on general English."""
    from pipelines.text_generation import TextGenerationPipeline
    from studio.adapters import attached

    llm = TextGenerationPipeline.from_pretrained(BASES["emoji-describer"], device="cpu", dtype="fp32")
    name = llm.load_adapter(str(folder), name="emoji-describer")
    _, held_out = split(emoji_lines())
    domain = [llm.tokenizer(line, add_special_tokens=False)["input_ids"] for line in held_out]
    general = {"licenses": general_windows(llm.tokenizer, [GENERAL_TEXT]),
               "documentation": documentation_windows(llm.tokenizer, held_out=True)}
    results = {"held_out_lines": len(domain), "general_windows": {k: len(v) for k, v in general.items()}}
    for label, adapter in (("base", None), ("adapter", llm.adapters[name])):
        with attached({"model": llm.model}, adapter):
            results[label] = {"domain_perplexity": perplexity(llm.model, domain)}
            for kind, windows in general.items():
                results[label][f"{kind}_perplexity"] = perplexity(llm.model, windows)
    for key in ("domain", "licenses", "documentation"):
        results[f"{key}_change"] = results["adapter"][f"{key}_perplexity"] / results["base"][f"{key}_perplexity"] - 1
    samples = {}
    for prompt in ("hot beverage:", "pizza:", "rocket:", "dog face:"):  # names the training lines hold too
        samples[prompt] = {label: llm(prompt, max_new_tokens=12, adapter=adapter, fast_path=False, stop="\n").text
                           for label, adapter in (("base", None), ("adapter", name))}
    results["samples"] = samples
    print("emoji-describer: " + ", ".join(
        f"{key} perplexity {results['base'][f'{key}_perplexity']:.1f} -> {results['adapter'][f'{key}_perplexity']:.1f} "
        f"({results[f'{key}_change']:+.1%})" for key in ("domain", "licenses", "documentation")), flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# symbola-outline (the diffusion lane)


def symbola_dataset() -> tuple[torch.Tensor, torch.Tensor, list[str], list[list[str]]]:
    """The emoji-sd training emoji that Symbola draws too: their Symbola renders, their Noto
    renders, names and keywords (the same captions the base model learned)."""
    from fontTools.ttLib import TTFont  # matplotlib's dependency: reads which characters a font has

    images, names, keywords = base_training.emoji_dataset()
    # Symbola draws a box with a question mark for what it lacks: only the emoji it has, by its cmap
    covered = TTFont(str(SYMBOLA_FONT)).getBestCmap()
    codepoints = [c for c in base_training.emoji_subset() if c in covered]
    outline, outline_names = base_training.emoji_glyphs(SYMBOLA_FONT, codepoints=codepoints)
    keep = [names.index(name) for name in outline_names]
    return outline, images[keep], outline_names, [keywords[i] for i in keep]


def train_symbola_outline(out: Path, steps: int, seed: int = 0) -> dict:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(assets.resolve(BASES["symbola-outline"]), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    outline, _, names, keywords = symbola_dataset()
    latents = base_training.latent_means(pipe.vae, outline) * pipe.vae.config.scaling_factor
    unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder.eval(), pipe.tokenizer
    # A style lives in the convolutions as much as in the attention: LoRA on both, rank 16, and on
    # the convolutions in and out of the latent, where colour is decided
    config = LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj",
                                        "conv_in", "conv_out", "proj_in", "proj_out"])
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(config)
    unet.train()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    scheduler = pipe.scheduler
    curve, started = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / 100)
        index = torch.randint(len(latents), (32,), generator=generator)
        # the base model's captions: the name half the time, else one to three keywords
        captions = [names[i] if torch.rand(1, generator=generator).item() < 0.5 else
                    ", ".join(keywords[i][j] for j in torch.randperm(len(keywords[i]), generator=generator)[:2].tolist())
                    for i in index.tolist()]
        ids = tokenizer(captions, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        noisy, noise, timesteps, weights = base_training.noised(latents[index], scheduler, generator, "cpu")
        with torch.no_grad():
            context = text_encoder(ids)[0]
        loss = base_training.weighted_mse(unet(noisy, timesteps, context).sample, noise, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"symbola-outline step {step + 1}/{steps}  loss {sum(curve[-100:]) / len(curve[-100:]):.4f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    unet.eval()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    parameters = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    record_in_manifest(
        "symbola-outline", out, kind="diffusion-adapter", base=BASES["symbola-outline"], parameters=parameters,
        architecture="LoRA rank 16 on emoji-sd's UNet: the attention projections, every ResNet convolution and "
                     "time-embedding projection, the convolutions in and out of the latent",
        training_data=f"{len(names)} of emoji-sd's training emoji rendered in the Symbola font (black outlines) "
                      "at 64x64, with emoji-sd's captions",
        training_data_license="Symbola font: free for any use (Debian package fonts-symbola); CLDR annotations: "
                              "Unicode License v3",
        source=f"trained by `studio train symbola-outline` ({steps} steps, batch 32, seed {seed})",
        format="diffusers-lora", example_prompt="red apple",
    )
    return {"loss": curve, "seconds": time.perf_counter() - started}


@torch.no_grad()
def evaluate_symbola_outline(folder: Path, prompts: int = 100, steps: int = 20, seed: int = 0) -> dict:
    """For a fixed sample of the emoji Symbola draws, prompted by name with and without the
    adapter: is the generated image nearer (Euclidean, 64x64 RGB) to the emoji's Symbola render
    than to its Noto render?"""
    from pipelines.latent_diffusion import LatentDiffusionPipeline

    outline, colour, names, _ = symbola_dataset()
    pipe = LatentDiffusionPipeline.from_pretrained(BASES["symbola-outline"], device="cpu")
    name = pipe.load_adapter(str(folder), name="symbola-outline")
    chosen = torch.randperm(len(names), generator=torch.Generator().manual_seed(1234))[:prompts].tolist()
    results = {"prompts": [names[i] for i in chosen], "steps": steps, "guidance": DEFAULT_GUIDANCE}
    grid = []
    for label, adapter in (("without adapter", None), ("with adapter", name)):
        images = torch.stack([
            torch.from_numpy(pipe(names[i], steps=steps, guidance_scale=DEFAULT_GUIDANCE, seed=seed + i,
                                  adapter=adapter).pixels).permute(2, 0, 1) * 2 - 1
            for i in chosen
        ])
        to_outline = (images - outline[chosen]).flatten(1).norm(dim=1)
        to_colour = (images - colour[chosen]).flatten(1).norm(dim=1)
        prefers = (to_outline < to_colour).float().mean().item()
        results[label] = {"prefers_symbola_style": prefers}
        print(f"symbola-outline {label}: nearer the Symbola render for {prefers:.0%} of {len(chosen)} prompts",
              flush=True)
        grid.append(images[:10])
    base_training.save_grid(torch.cat([colour[chosen[:10]], grid[0], outline[chosen[:10]], grid[1]]), 10,
                            DOCS / "symbola-outline-samples.png", scale=2)
    return results


# ---------------------------------------------------------------------------------------------
# The `studio train` and `studio evaluate` commands for adapters


def train(name: str, out: Path | None = None, steps: int | None = None) -> None:
    out = out or assets.MANIFEST.parent / name
    trainer = {"emoji-describer": train_emoji_describer, "symbola-outline": train_symbola_outline}[name]
    curves = trainer(out, steps or STEPS[name])
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{name}-training.json").write_text(json.dumps(curves))


def evaluate(name: str, folder: Path | None = None) -> None:
    folder = folder or Path(assets.resolve(name))
    results = {"emoji-describer": evaluate_emoji_describer, "symbola-outline": evaluate_symbola_outline}[name](folder)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"{name}-metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
