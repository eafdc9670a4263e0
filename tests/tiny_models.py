"""Every tiny random model the tests build, in one place: both lanes' models and their tokenizers.

Built in code as transformers' and diffusers' own tests build them, so nothing is downloaded.
The models come back in eval mode, as from_pretrained gives them. Builders of whole pipelines'
parts and of LLMs seed the generator themselves; a single component (a UNet, a VAE, ...) draws
from it as it stands, so a caller seeds once and builds several in a fixed order.
"""

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from studio.bench import byte_tokenizer as studio_byte_tokenizer

# ---------------------------------------------------------------------------------------------
# The LLM lane

LLM_FAMILIES = ["llama", "gpt2", "qwen2"]
LLAMA_LIKE = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
BYTE_VOCAB = 258  # the byte tokenizer's: 256 bytes, <eos> 256, <pad> 257
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The benchmark's offline byte-level tokenizer (256 byte tokens, <eos> 256, <pad> 257), with a
    chat template so chat prompts can be tested."""
    tokenizer = studio_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llm(family: str = "llama", seed: int = 0, layers: int = 2, *, hidden: int = 64, kv_heads: int = 2,
             positions: int = 256, byte_vocab: bool = True, sharpen: bool = True, **config):
    """A tiny random causal LM of `family` (llama, gpt2 or qwen2): 4 heads, an MLP twice `hidden` wide.

    By default it speaks the byte tokenizer's vocabulary and special tokens, and its output head is
    scaled x4: random weights give flat distributions, a sharper head gives greedy clear winners.
    `byte_vocab=False` gives a 128-token vocabulary with the library's own special tokens instead;
    `config` passes further config fields (tie_word_embeddings=True, ...)."""
    torch.manual_seed(seed)
    if byte_vocab:
        config = dict(vocab_size=BYTE_VOCAB, eos_token_id=256, pad_token_id=257, bos_token_id=None, **config)
    else:
        config = dict(vocab_size=128, **config)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=positions, **config))
    elif family in LLAMA_LIKE:
        config_class, model_class = LLAMA_LIKE[family]
        model = model_class(config_class(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=kv_heads, max_position_embeddings=positions, **config,
        ))
    else:
        raise ValueError(family)
    if sharpen:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(4.0)
    return model.eval()


def plain_llm(family: str = "llama", **config):
    """A tiny LLM as the library builds it from a bare config (128 tokens, its own special tokens, the
    head not sharpened): the backend tests feed it token ids, not text."""
    return tiny_llm(family, byte_vocab=False, positions=128, sharpen=False, **config)


# ---------------------------------------------------------------------------------------------
# The diffusion lane: components

SIZE = 32  # pixels: 16 x 16 latents through the tiny VAE (factor 2)


def tiny_unet(layers_per_block: int = 2, sample_size: int = 32) -> UNet2DConditionModel:
    """A two-level conditional UNet (32 and 64 channels, cross-attention on the lower level) for
    32-dimensional text embeddings and 4 latent channels."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=layers_per_block, sample_size=sample_size, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=32,
    ).eval()


def tiny_dit(sample_size: int = 16, patch_size: int = 4, head_dim: int = 8, classes: int = 1000):
    """A two-block class-conditioned DiT (two heads, adaLN-zero) over 4 latent channels; it predicts
    noise and variance (8 channels out). The defaults are the diffusion lane's (ImageNet's 1000
    classes); the backend tests use an 8 x 8 one with 10 classes."""
    return DiTTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=patch_size, attention_head_dim=head_dim,
        num_attention_heads=2, in_channels=4, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=classes, norm_type="ada_norm_zero", norm_elementwise_affine=False,
    ).eval()  # in training mode DiT drops class labels at random


def tiny_pixart() -> PixArtTransformer2DModel:
    """A two-block PixArt-alpha transformer (three heads, adaLN-single) reading 32-dimensional T5
    embeddings."""
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    """A two-level KL autoencoder: RGB to 4 latent channels at half the resolution."""
    return AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=32,
    ).eval()


def tiny_clip_text_encoder() -> CLIPTextModel:
    """A five-layer CLIP text encoder giving 32-dimensional embeddings, with clip_tokenizer's special
    token ids."""
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000,
    )).eval()


def tiny_t5_encoder(vocab: int = 40, buckets: int = 8) -> T5EncoderModel:
    """A two-layer T5 encoder giving 32-dimensional embeddings; the defaults fit t5_tokenizer."""
    return T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=buckets
    )).eval()  # T5's dropout is on in training mode


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every character is a token."""
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for char in bytes_to_unicode().values():
        for token in (char, char + "</w>"):
            vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer of single lower-case letters and a few vowel word starts."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(char, -2.0) for char in "abcdefghijklmnopqrstuvwxyz"] + [("▁" + char, -1.5) for char in "aeiou"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion's DDIM schedule."""
    # steps_offset=1 as Stable Diffusion ships it: the stock pipeline rewrites any other value
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


# ---------------------------------------------------------------------------------------------
# The diffusion lane: whole pipelines, as the keyword arguments of the stock diffusers pipelines


def tiny_sd_components() -> dict:
    """A tiny Stable Diffusion, seeded: UNet, VAE, CLIP text encoder and tokenizer, DDIM scheduler."""
    torch.manual_seed(0)
    unet, vae, text_encoder = tiny_unet(), tiny_vae(), tiny_clip_text_encoder()
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=sd_scheduler())


def tiny_dit_components() -> dict:
    """A tiny class-conditioned DiT pipeline, seeded: transformer, VAE, DDIM scheduler."""
    torch.manual_seed(0)
    transformer, vae = tiny_dit(), tiny_vae()
    return dict(transformer=transformer, vae=vae, scheduler=DDIMScheduler())


def tiny_pixart_components() -> dict:
    """A tiny PixArt-alpha, seeded: transformer, VAE, T5 encoder and tokenizer, DDIM scheduler."""
    torch.manual_seed(0)
    transformer, text_encoder, vae = tiny_pixart(), tiny_t5_encoder(), tiny_vae()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=t5_tokenizer(),
                scheduler=DDIMScheduler())


def stock_sd(parts: dict) -> StableDiffusionPipeline:
    """diffusers' own StableDiffusionPipeline on the parts, without a safety checker or progress bar."""
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def studio_pipeline(parts: dict, **kwargs):
    """Our LatentDiffusionPipeline on a stock pipeline's parts (a UNet or a transformer; a text
    encoder and tokenizer where there are)."""
    from pipelines import LatentDiffusionPipeline  # here, so the model-only tests do not load the lanes

    denoiser = parts["unet"] if "unet" in parts else parts["transformer"]
    return LatentDiffusionPipeline(
        denoiser, parts["vae"], parts["scheduler"], parts.get("text_encoder"), parts.get("tokenizer"), **kwargs
    )


def generate_image(pipe, prompt: str = "a red apple", **kwargs):
    """A small, quick image from the tiny pipeline: 3 steps, guidance 5, seed 0, SIZE x SIZE pixels."""
    return pipe(prompt, **{"steps": 3, "guidance_scale": 5.0, "seed": 0, "height": SIZE, "width": SIZE, **kwargs})


# ---------------------------------------------------------------------------------------------
# LoRA adapters, written by the stock libraries


def save_peft_adapter(folder, family="llama", targets=("q_proj", "v_proj"), rank=4, **model_config):
    """A peft LoRA for tiny_llm(family) with non-zero weights on both matrices
    (init_lora_weights=False), as training leaves it, saved by peft into `folder`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(tiny_llm(family, **model_config), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False, task_type="CAUSAL_LM",
        fan_in_fan_out=family == "gpt2"))  # GPT-2's Conv1D layers store their weights transposed
    model.save_pretrained(folder)
    return folder


def save_diffusers_lora(folder):
    """A diffusers LoRA for tiny_sd_components()' UNet (attention and convolutions) and text
    encoder, non-zero, written by diffusers' own save_lora_weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(2)
    pipe = stock_sd(tiny_sd_components())
    unet_config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
                             init_lora_weights=False)  # convolutions too, as a style adapter needs
    text_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(text_config, pipe.text_encoder)  # peft's own (transformers' add_adapter wants a newer peft)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    return folder
