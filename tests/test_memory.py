"""Memory the lanes hold: no leak across many generations, some of them stopped midway."""

import gc

from tiny_models import byte_tokenizer, tiny_llm

from pipelines.text_generation import TextGenerationPipeline
from studio.bench import malloc_trim, rss_bytes


def resident() -> int:
    gc.collect()
    malloc_trim()  # freed heap goes back to the OS, so the RSS is what is still in use
    return rss_bytes()


def test_fifty_generations_some_stopped_midway_leave_no_leak():
    # big enough that a leaked KV cache (about 3 MB a run) would show: 50 of them are 150 MB
    model = tiny_llm("llama", layers=8, hidden=256, kv_heads=4, positions=512, sharpen=False)
    llm = TextGenerationPipeline(model, byte_tokenizer())
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
