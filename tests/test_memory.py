"""Memory the lanes hold: no leak across many generations, some of them stopped midway."""

import gc

import torch
from tiny_llms import byte_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from pipelines.text_generation import TextGenerationPipeline
from studio.bench import malloc_trim, rss_bytes


def resident() -> int:
    gc.collect()
    malloc_trim()  # freed heap goes back to the OS, so the RSS is what is still in use
    return rss_bytes()


def test_fifty_generations_some_stopped_midway_leave_no_leak():
    # big enough that a leaked KV cache (about 3 MB a run) would show: 50 of them are 150 MB
    config = LlamaConfig(vocab_size=258, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         eos_token_id=256, pad_token_id=257)
    torch.manual_seed(0)
    llm = TextGenerationPipeline(LlamaForCausalLM(config), byte_tokenizer())
    prompt = "The cat sat on the mat. " * 6
    for _ in range(3):  # allocator and caches warm up on the first runs
        llm(prompt, max_new_tokens=24)
    start = resident()
    for run in range(50):
        if run % 5 == 4:  # every fifth is stopped after a few tokens, as the Stop button does
            stream = llm.stream(prompt, max_new_tokens=24, temperature=1.0, seed=run)
            for _ in range(6):
                next(stream)
            stream.close()
        else:
            llm(prompt, max_new_tokens=24, temperature=1.0, seed=run)
    assert resident() <= start * 1.05, (start, resident())
