"""llama.cpp next to the LLM lane: the GGUF file the studio loaded its model from, run by llama.cpp
through the prebuilt binding cyllama (the optional extra `llamacpp`: `pip install '.[llamacpp]'`),
on the same prompts, the same number of new tokens and the same CPU threads as the lane, and timed
the same way as the lane and transformers' generate(): wall clock around the whole call, time to
first token from the start (tokenizing included) and decode tokens/s as (new tokens - 1) over
the time after the first.

    runner = LlamaCpp(gguf_path("smollm2-135m")[0], context=512, threads=torch.get_num_threads())
    runner.generate("The cat sat", new_tokens=128)   # {"ttft_ms": ..., "decode_tok_s": ..., ...}

It drives llama.cpp's low-level API (a context, a batch per step, a greedy sampler), so that the
thread count is exactly the studio's; each new token is turned into its text, as a streaming
client would. The studio's events do more per token (top-k of two distributions, timings,
shapes): that is the cost the goals count against it.

Depends on the standard library, and on studio.assets inside a function; imports cyllama inside
its functions, so that the bench runs, and says why this row is skipped, where it is not
installed. Never imports a lane of the bench, the goals, the report, a pipeline or the UI.
"""

from __future__ import annotations

from pathlib import Path
from time import perf_counter

EXTRA = "cyllama==0.2.18"  # pyproject.toml's optional extra `llamacpp`


def unavailable() -> str | None:
    """Why llama.cpp cannot run here (its binding is not installed), or None."""
    try:
        import cyllama.llama.llama_cpp  # noqa: F401
    except ImportError as error:
        return (f"llama.cpp's Python binding is not installed (pip install '.[llamacpp]', i.e. {EXTRA}; "
                f"a prebuilt wheel where the platform has one): {error}")
    return None


def version() -> str:
    import cyllama
    import cyllama.llama.llama_cpp as L

    return f"cyllama {getattr(cyllama, '__version__', '?')}, ggml {L.ggml_version()} ({L.ggml_commit()})"


def gguf_path(name: str) -> tuple[Path | None, str | None]:
    """The GGUF file a model was loaded from (a shipped model's, or a .gguf path), or why none."""
    path = Path(name)
    if path.suffix == ".gguf":
        return (path, None) if path.is_file() else (None, f"no such GGUF file: {name}")
    from studio import assets

    model = assets.load_manifest().get(name)
    if model is None:
        return None, f"{name} was not loaded from a GGUF file (llama.cpp reads GGUF only)"
    if model.format != "gguf":
        return None, f"the shipped {name} is {model.format}, not GGUF (llama.cpp reads GGUF only)"
    path = model.root() / model.files[0].path
    if not path.is_file():
        return None, f"{name}'s GGUF file is missing ({path}); restore it with: {model.restore}"
    return path, None


class LlamaCpp:
    """One GGUF model in llama.cpp: a context of `context` tokens, `threads` threads for prompt and
    decode alike, greedy decoding."""

    def __init__(self, path: str | Path, context: int, threads: int):
        import cyllama.llama.llama_cpp as L

        L.disable_logging()  # llama.cpp logs every load and context to stderr
        L.llama_backend_init()
        self.L, self.threads = L, threads
        self.model = L.LlamaModel(str(path), L.LlamaModelParams())
        params = L.LlamaContextParams()
        params.n_ctx = context
        params.n_batch = params.n_ubatch = context  # the whole prompt in one batch, as the lane's prefill
        params.n_threads = params.n_threads_batch = threads
        self.context = context
        self.ctx = L.LlamaContext(self.model, params)
        self.vocab = self.model.get_vocab()

    @property
    def quantization(self) -> str:
        """The weights' format from the model's description, e.g. 'Q4_1' of 'llama 256M Q4_1'."""
        return self.model.desc.split()[-1]

    @property
    def weights_bytes(self) -> int:
        return int(self.model.size)

    def tokens(self, prompt: str) -> list[int]:
        return list(self.vocab.tokenize(prompt, True, True))

    def generate(self, prompt: str, new_tokens: int) -> dict:
        """Exactly `new_tokens` greedy tokens after `prompt` (end-of-text tokens do not stop it, as
        in the lane's and generate()'s benchmark rows); timed as they are."""
        L, ctx = self.L, self.ctx
        ctx.kv_cache_clear()
        sampler = L.LlamaSampler(L.LlamaSamplerChainParams())
        sampler.add_greedy()
        started = perf_counter()
        tokens = self.tokens(prompt)
        if len(tokens) + new_tokens > self.context:
            raise ValueError(f"{len(tokens)} prompt + {new_tokens} new tokens exceed the context of {self.context}")
        ctx.decode(L.llama_batch_get_one(tokens))
        token = sampler.sample(ctx, -1)
        out, text = [token], [self.vocab.token_to_piece(token, 0, True)]
        first = perf_counter()
        position = len(tokens)
        for _ in range(new_tokens - 1):
            ctx.decode(L.llama_batch_get_one([token], position))
            position += 1
            token = sampler.sample(ctx, -1)
            out.append(token)
            text.append(self.vocab.token_to_piece(token, 0, True))
        total = perf_counter() - started
        ttft = first - started
        return {"ttft_ms": ttft * 1e3, "decode_tok_s": (new_tokens - 1) / (total - ttft) if new_tokens > 1 else None,
                "prompt_len": len(tokens), "run_ms": total * 1e3, "token_ids": out, "text": "".join(text)}

    def close(self):
        for handle in (self.ctx, self.model):
            close = getattr(handle, "close", None)
            if close is not None:
                close()
