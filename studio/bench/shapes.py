"""The models `studio bench` runs that nobody trained: a reference config's architecture
(assets/configs/) with random weights, fed by a byte tokenizer that needs no files; and which
reference architecture a loaded model has, so that the goals can find its rows.

    llm = build_llm_shape("llama-3.2-1b", "cuda", torch.bfloat16)     # a TextGenerationPipeline
    pipe = build_diffusion_shape("sd-1.5-unet", "cuda", torch.float16)  # a LatentDiffusionPipeline

Depends on torch and studio.inspector; imports the pipelines (and transformers, diffusers,
tokenizers) inside its functions, as a consumer of the lanes. Never imports another module of the
bench or the UI.
"""

from __future__ import annotations

import contextlib

import torch

from studio import inspector


def byte_tokenizer(max_length: int | None = None):
    """A tokenizer needing no files: 256 byte tokens plus <eos> (256) and <pad> (257), so that a
    model built from a config (random weights, no tokenizer of its own) can be fed text. Any text
    of n ASCII characters is n tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    kwargs = {"model_max_length": max_length} if max_length else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", **kwargs)


def build_llm_shape(name: str, device, dtype: torch.dtype):
    """A TextGenerationPipeline over a reference config's architecture with random weights
    (transformers' own initialisation: non-zero) and the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipelines.text_generation import TextGenerationPipeline

    loaded = inspector.load_config(name)
    if loaded.kind != "llm":
        raise ValueError(f"{name} is a diffusion config; use it as a diffusion shape")
    fields = dict(loaded.config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if config.get_text_config().vocab_size < 258:
        raise ValueError(f"{name}: a vocabulary of {config.vocab_size} is too small for the byte tokenizer (258)")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return TextGenerationPipeline(model.to(device).eval(), byte_tokenizer(), device)


def build_diffusion_shape(name: str, device, dtype: torch.dtype):
    """A LatentDiffusionPipeline over a reference pipeline folder's architectures with random
    weights: the denoiser, the VAE and the text encoder from their configs, the scheduler from its
    config, and the byte tokenizer (the text encoder runs once per image and sets no figure here)."""
    import diffusers

    from pipelines.latent_diffusion import TRANSFORMER_PROMPT_TOKENS, LatentDiffusionPipeline

    loaded = inspector.load_config(name)
    if loaded.kind != "diffusion":
        raise ValueError(f"{name} is an LLM config; use it as an LLM shape")
    if "text_encoder_2" in loaded.components:
        raise ValueError(
            f"{name} has two text encoders (SDXL-style), which the diffusion lane does not run yet; "
            f"`studio inspect {name}` analyses it"
        )
    missing = [part for part in ("vae", "scheduler") if part not in loaded.components]
    if missing:
        raise ValueError(f"{name} has no {' or '.join(missing)} config: give a pipeline folder")

    def fields(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    with _default_dtype(dtype), torch.device(device):
        denoiser = inspector.diffusers_model_class(loaded.config).from_config(fields(loaded.config))
        vae = diffusers.AutoencoderKL.from_config(fields(loaded.components["vae"]))
    scheduler_config = loaded.components["scheduler"]
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(fields(scheduler_config))
    text_encoder = tokenizer = None
    if "text_encoder" in loaded.components:
        meta = inspector.text_encoder_on_meta(loaded.components["text_encoder"])
        with torch.device(device):
            text_encoder = type(meta)._from_config(meta.config, dtype=dtype)
        is_unet = isinstance(denoiser, diffusers.UNet2DConditionModel)
        tokens = loaded.components["text_encoder"].get("max_position_embeddings", 77) if is_unet else TRANSFORMER_PROMPT_TOKENS
        tokenizer = byte_tokenizer(max_length=tokens)
    text_encoder = text_encoder.to(device).eval() if text_encoder is not None else None
    # the plain layout, as diffusers builds the models: the bench turns the fast path on for its rows
    return LatentDiffusionPipeline(
        denoiser.to(device).eval(), vae.to(device).eval(), scheduler, text_encoder, tokenizer, device=device,
        fast_path=False,
    )


def reference_name(config: dict, kind: str) -> str | None:
    """The reference config whose architecture this config has, if any (for the goals)."""
    ignore = {"_name_or_path", "torch_dtype", "dtype", "transformers_version", "_diffusers_version", "architectures",
              "bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "use_cache", "rope_scaling",
              "rope_parameters", "rope_theta", "initializer_range", "_class_name", "_use_default_values"}
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "n_embd", "n_layer", "block_out_channels", "num_layers", "attention_head_dim",
            "sample_size", "cross_attention_dim")
    for name, folder in inspector.reference_configs().items():
        try:
            reference = inspector.load_config(folder)
        except (ValueError, OSError):
            continue
        if reference.kind != kind:
            continue
        pairs = [(config.get(k), reference.config.get(k)) for k in keys if k in reference.config and k not in ignore]
        if pairs and all(_same(a, b) for a, b in pairs):
            return name
    return None


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """torch's default dtype set to `dtype` inside the block, so the modules built there take it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
