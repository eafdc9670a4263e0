"""Tiny random causal LMs and an offline byte-level tokenizer, for the LLM lane's unit tests."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from studio.bench import byte_tokenizer as studio_byte_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The benchmark's offline byte-level tokenizer (256 byte tokens, <eos> 256, <pad> 257), with a
    chat template so chat prompts can be tested."""
    tokenizer = studio_byte_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


VOCAB = 258


def tiny_llm(family: str, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, eos_token_id=256, pad_token_id=257, bos_token_id=None)
    if family == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
        model = LlamaForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=256, **common)
        model = GPT2LMHeadModel(config)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, **common)
        model = Qwen2ForCausalLM(config)
    else:
        raise ValueError(family)
    # random weights give flat distributions; sharpen them so greedy has clear winners
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model.eval()
