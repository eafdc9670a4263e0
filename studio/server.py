"""The OpenAI-compatible API: the LLM lane served over HTTP, so that the `openai` client, curl or
another studio's remote lane (pipelines/remote.py) can use a model this machine runs.

    api = create_api({"smollm2-135m": llm})   # or create_api(): the shipped model, loaded on first use
    uvicorn.run(api, port=8000)                # `studio serve --api-only` does this

    POST /v1/completions        prompt (a string or a list of strings) -> text
    POST /v1/chat/completions   messages -> the assistant's reply, through the model's chat template
    GET  /v1/models             the names served (a LoRA adapter is a model of its own, vLLM-style)

The JSON is OpenAI's, with vLLM's shape for a completion's log-probabilities (`tokens`,
`token_logprobs`, `top_logprobs`, `text_offset`) and vLLM's extra sampling fields (`top_k`,
`min_p`, `repetition_penalty`, and `stop_reason` in the answer). Every number comes from the
pipeline's own events: a client sees exactly the log-probabilities the studio shows, taken from
the model's raw distribution (before temperature and top-p, as vLLM reports them).

What the lane cannot honour is refused with a 400 rather than silently ignored (vLLM's choice, not
OpenAI's): `n` or `best_of` above 1, `echo`, `suffix`, `logit_bias`, presence and frequency
penalties, token-id prompts and any field this module does not know (tools, response_format...).
`user` is accepted and ignored: it only labels the caller. Types are strict ("8", true or 2.0 is no
token count), and what Python's JSON reader takes beyond JSON is refused: NaN and Infinity, nesting
deeper than MAX_JSON_DEPTH, integers too long to convert, lone surrogates ("\\ud800"). Every refusal
is a 400 on a connection that stays open; a bug is a 500 in the same shape, the connection open too.

Generation runs in a worker thread, apart from the client that asked for it: one request at a
time per model, its events buffered per request. The event loop keeps answering while a model
works, and a client that reads slowly holds only its own buffer, never the model. A client that
leaves stops its generation (after the current step), whether it was reading a stream, waiting for
a whole answer or still queued for the model; a queued one never starts.

Requests are read by studio/api_requests.py. Depends on FastAPI (with starlette) and the studio
core. Like the CLI it sits above
the lanes: it imports the LLM lane only to load a model by name. Never imports Gradio.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from studio import assets
from studio.api_requests import APIError, ChatMessage, ChatRequest, CompletionRequest, SamplingRequest, parse_request

log = logging.getLogger(__name__)

DEFAULT_MODEL = assets.default_model("llm")  # the shipped default LLM (smollm2-135m)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
# A probability that underflowed to 0 has no finite log and JSON has no -inf: report vLLM's floor.
LOGPROB_FLOOR = -9999.0
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # the lane's -> OpenAI's


# ---------------------------------------------------------------------------------------------
# Models and their generations
# ---------------------------------------------------------------------------------------------


def loader(name_or_path: str, **options) -> Callable[[], object]:
    """A function that loads `name_or_path` as a TextGenerationPipeline (options go to
    from_pretrained), for create_api to call on the first request that names the model."""

    def load():
        from pipelines.text_generation import TextGenerationPipeline

        return TextGenerationPipeline.from_pretrained(name_or_path, **options)

    return load


class _ServedModel:
    """One served model: its pipeline, or the loader that makes it on first use, and its lock.
    A LoRA adapter is served as a model of its own over its base's pipeline (as vLLM's
    --lora-modules are): it shares the base's lock and loads its adapter on first use."""

    def __init__(self, name: str, source, base: _ServedModel | None = None):
        self.name = name
        self.created = int(time.time())
        self.base = base
        self.adapter = name if base is not None else None  # the name stream(adapter=) is given
        is_pipeline = hasattr(source, "stream")
        self._pipeline = None
        self._load = None if is_pipeline else source  # for an adapter: its folder or shipped name
        self.tokenizer = None  # the answers' own copy of the lane's tokenizer, once loaded
        if is_pipeline:
            self._take(source)
        self._loading = asyncio.Lock()
        # One generation at a time: a pipeline call switches the model's attention backend,
        # precision and adapter for its duration, so two calls at once could run under each
        # other's settings. An adapter and its base are one model.
        self.busy = base.busy if base is not None else asyncio.Lock()

    async def pipeline(self):
        if self.base is not None:
            pipeline = await self.base.pipeline()
            async with self._loading:
                if self.adapter not in pipeline.adapters:
                    try:
                        await run_in_threadpool(pipeline.load_adapter, self._load, self.adapter)
                    except Exception as error:
                        raise APIError(500, f"the adapter {self.name!r} could not be loaded: {error}",
                                       code="model_load_failed")
                self.tokenizer = self.base.tokenizer
            return pipeline
        async with self._loading:
            if self._pipeline is None:
                try:
                    self._take(await run_in_threadpool(self._load))
                except Exception as error:
                    raise APIError(500, f"the model {self.name!r} could not be loaded: {error}", code="model_load_failed")
        return self._pipeline

    def _take(self, pipeline):
        self._pipeline = pipeline
        # The lane uses its tokenizer in the worker thread (and sets its padding there); a Rust
        # tokenizer used by two threads at once fails ("Already borrowed"), so the answers are
        # written, on the event loop, with a copy.
        self.tokenizer = copy.deepcopy(pipeline.tokenizer)


class _Generation:
    """One request's events: produced in a worker thread under the model's lock, buffered here
    until the client takes them. The buffer holds at most max_tokens events per prompt."""

    _END = object()

    def __init__(self, model: _ServedModel, pipeline, prompt, options: dict):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()  # set when the client has gone: the lane stops after its current step
        self.ended = False  # the end has been taken from the queue (by prompt_tokens, if it never began)
        self.task = asyncio.create_task(self._produce(model, pipeline, prompt, options))

    async def _produce(self, model, pipeline, prompt, options):
        try:
            async with model.busy:
                if self.stop.is_set():  # the client left while waiting for the model
                    return
                events = pipeline.stream(prompt, stop_event=self.stop, adapter=model.adapter, **options)
                try:
                    async for event in iterate_in_threadpool(events):
                        self.queue.put_nowait(event)
                finally:
                    events.close()  # frees the KV cache now, even if the client left mid-way
        except Exception as error:
            self.queue.put_nowait(error)
        finally:
            self.queue.put_nowait(self._END)

    async def next(self):
        """The next event; None at the end, and after it. A failure in the lane is raised here."""
        if self.ended:
            return None
        item = await self.queue.get()
        if isinstance(item, Exception):
            raise item
        self.ended = item is self._END
        return None if self.ended else item

    async def prompt_tokens(self, prompts: int) -> int:
        """Wait for the tokenize events (one per prompt) and count the prompts' tokens. The lane
        checks its input before it tokenizes, so a bad request fails here, before any response."""
        total = 0
        for _ in range(prompts):
            try:
                event = await self.next()
            except ValueError as error:
                raise APIError(400, str(error)) from None
            except Exception as error:
                raise APIError(500, f"generation failed: {error}") from None
            if event is None:  # stopped before it began
                break
            total += len(event.token_ids)
        return total

    async def tokens(self):
        while (event := await self.next()) is not None:
            yield event


def sampling_options(request: SamplingRequest, max_tokens: int, top_logprobs: int) -> dict:
    """The pipeline's stream() arguments for a request."""
    return dict(
        max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        min_p=request.min_p, repetition_penalty=request.repetition_penalty,
        # no seed means a fresh draw every time, as OpenAI and vLLM do
        seed=request.seed if request.seed is not None else secrets.randbelow(2**63),
        top_logprobs=top_logprobs, stop=request.stops(),
    )


# ---------------------------------------------------------------------------------------------
# Answers: the lane's events as OpenAI's JSON
# ---------------------------------------------------------------------------------------------


def _logprob(prob: float) -> float:
    return math.log(prob) if prob > 0 else LOGPROB_FLOOR


class _Choice:
    """One prompt's answer as its events arrive: the text, the token strings, the finish."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.text, self.tokens, self.events, self.token_ids = "", [], [], []
        self.offsets, self._chars = [], 0  # where each token string starts, counting the ones before it
        self.finish_reason = self.stop_reason = None

    def add(self, event):
        """Take one token event. Its `text` is what it added to the answer (held back while it could
        be part of a stop string); the token's own text is what logprobs report."""
        self.text += event.text
        token = self.tokenizer.decode([event.token_id])
        self.tokens.append(token)
        self.offsets.append(self._chars)
        self._chars += len(token)
        self.events.append(event)
        self.token_ids.append(event.token_id)
        if event.finish_reason:
            self.finish_reason = FINISH_REASONS.get(event.finish_reason, event.finish_reason)
            if event.finish_reason == "stop":
                self.stop_reason = self._stop_string()

    def _stop_string(self) -> str | None:
        """vLLM's stop_reason: which stop string ended the answer (the earliest in the text)."""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return min((s for s in self.stops if s in text), key=text.find, default=None)

    def completion_logprobs(self, start: int = 0) -> dict:
        """vLLM's shape for the tokens from `start` on; text_offset counts the token strings' characters."""
        top = []
        for event in self.events[start:]:
            alternatives = {}
            for text, _, prob in event.top:
                alternatives.setdefault(text, _logprob(prob))  # two tokens may share a text: keep the likelier
            top.append(alternatives)
        return {"tokens": self.tokens[start:], "token_logprobs": [e.logprob for e in self.events[start:]],
                "top_logprobs": top, "text_offset": self.offsets[start:]}

    def chat_logprobs(self, start: int = 0) -> dict:
        """OpenAI's chat shape: one entry per token, its alternatives as a list (texts may repeat)."""
        content = []
        for token, event in zip(self.tokens[start:], self.events[start:]):
            top = [{"token": t, "logprob": _logprob(p), "bytes": list(t.encode())} for t, _, p in event.top]
            content.append({"token": token, "logprob": event.logprob, "bytes": list(token.encode()), "top_logprobs": top})
        return {"content": content}


def _usage(prompt_tokens: int, choices: list[_Choice]) -> dict:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _event_stream(generation: _Generation, chunks, head: dict):
    """Server-sent events: each chunk `chunks` makes from the token events, then [DONE]. Once the
    response has begun its status is sent, so a failure travels as an error chunk (as in vLLM)."""
    try:
        async for chunk in chunks(generation.tokens()):
            yield _sse({**head, **chunk})
    except Exception as error:
        yield _sse(APIError(500, f"generation failed: {error}").body())
    finally:
        generation.stop.set()  # the client left or the stream ended: the lane stops after its current step
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_api(models: Mapping[str, object] | None = None,
               adapters: Mapping[str, tuple[str, str]] | None = None) -> FastAPI:
    """The API as a FastAPI app. models: name -> a TextGenerationPipeline, or a function of no
    arguments that returns one (called by the first request that names it; see `loader`).
    Default: the shipped smollm2-135m, loaded on first use. adapters: name -> (the served model
    it adapts, its LoRA folder or shipped name): each is served as a model of its own."""
    if models is None:
        models = {DEFAULT_MODEL: loader(DEFAULT_MODEL)}
    served = {name: _ServedModel(name, source) for name, source in models.items()}
    for name, (base, path) in (adapters or {}).items():
        if name in served or base not in served:
            problem = "is already a served model's name" if name in served else f"adapts {base!r}, which is not served"
            raise ValueError(f"adapter {name!r} {problem}; served: {', '.join(served)}")
        served[name] = _ServedModel(name, path, base=served[base])
    api = FastAPI(title="Generation Studio API", description="OpenAI-compatible completions from the LLM lane")

    def find(name: str) -> _ServedModel:
        if name not in served:
            raise APIError(404, f"the model {name!r} does not exist here; served: {', '.join(served)}",
                           param="model", code="model_not_found")
        return served[name]

    @api.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    api.add_middleware(_ContainErrors)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        # unknown paths and wrong methods answer in the same shape as every other error
        body = APIError(error.status_code, str(error.detail)).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @api.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(m) for m in served.values()]}

    @api.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return _model_card(find(name))

    @api.post("/v1/completions")
    async def completions(request: Request):
        body = parse_request(CompletionRequest, await request.body())
        model = find(body.model)
        pipeline = await model.pipeline()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        max_tokens = fit_context(model, pipeline, prompts, body.max_tokens or DEFAULT_MAX_TOKENS, "prompt")
        generation = _Generation(model, pipeline, prompts, sampling_options(body, max_tokens, body.logprobs or 0))
        async with _stop_if_client_leaves(request, generation.stop):
            prompt_tokens = await generation.prompt_tokens(len(prompts))
        choices = [_Choice(model.tokenizer, body.stops()) for _ in prompts]
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model.name}

        if body.stream:
            async def chunks(events):
                async for event in events:
                    choice = choices[event.sequence]
                    choice.add(event)
                    logprobs = choice.completion_logprobs(len(choice.tokens) - 1) if body.logprobs is not None else None
                    yield {"choices": [{"index": event.sequence, "text": event.text, "logprobs": logprobs,
                                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}]}
                if body.stream_options and body.stream_options.include_usage:
                    yield {"choices": [], "usage": _usage(prompt_tokens, choices)}

            return StreamingResponse(_event_stream(generation, chunks, head), media_type="text/event-stream")

        async with _stop_if_client_leaves(request, generation.stop):
            async for event in _collect(generation):
                choices[event.sequence].add(event)
        return {
            **head,
            "choices": [
                {"index": i, "text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                 "logprobs": c.completion_logprobs() if body.logprobs is not None else None}
                for i, c in enumerate(choices)
            ],
            "usage": _usage(prompt_tokens, choices),
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_request(ChatRequest, await request.body())
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        model = find(body.model)
        pipeline = await model.pipeline()
        prompt = chat_prompt(model.tokenizer, body.messages)
        max_tokens = fit_context(model, pipeline, [prompt], body.max_completion_tokens or body.max_tokens, "messages")
        options = sampling_options(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else 0)
        generation = _Generation(model, pipeline, prompt, options)
        async with _stop_if_client_leaves(request, generation.stop):
            prompt_tokens = await generation.prompt_tokens(1)
        choice = _Choice(model.tokenizer, body.stops())
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model.name}

        if body.stream:
            async def chunks(events):
                yield {"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
                async for event in events:
                    choice.add(event)
                    logprobs = choice.chat_logprobs(len(choice.tokens) - 1) if body.logprobs else None
                    yield {"object": "chat.completion.chunk",
                           "choices": [{"index": 0, "delta": {"content": event.text}, "logprobs": logprobs,
                                        "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}]}
                if body.stream_options and body.stream_options.include_usage:
                    yield {"object": "chat.completion.chunk", "choices": [], "usage": _usage(prompt_tokens, [choice])}

            return StreamingResponse(_event_stream(generation, chunks, head), media_type="text/event-stream")

        async with _stop_if_client_leaves(request, generation.stop):
            async for event in _collect(generation):
                choice.add(event)
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": choice.text},
                         "logprobs": choice.chat_logprobs() if body.logprobs else None,
                         "finish_reason": choice.finish_reason, "stop_reason": choice.stop_reason}],
            "usage": _usage(prompt_tokens, [choice]),
        }

    return api


async def _collect(generation: _Generation):
    """A non-streamed answer's events; a failure mid-way becomes a 500."""
    try:
        async for event in generation.tokens():
            yield event
    except Exception as error:
        raise APIError(500, f"generation failed: {error}") from None


def _model_card(model: _ServedModel) -> dict:
    card = {"id": model.name, "object": "model", "created": model.created, "owned_by": "generation-studio"}
    if model.base is not None:  # as vLLM lists a LoRA module: its base is its parent
        card |= {"root": model.name, "parent": model.base.name}
    return card


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The conversation through the model's chat template, ending where the assistant's reply begins."""
    if tokenizer.chat_template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template(
        [m.as_template_input() for m in messages], tokenize=False, add_generation_prompt=True
    )
    # The template writes the beginning-of-sequence token itself; a tokenizer that also adds one to
    # plain text (Llama, Mistral) would double it when the lane tokenizes this text.
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    if adds_bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def fit_context(model: _ServedModel, pipeline, prompts: list[str], max_tokens: int | None, param: str) -> int:
    """max_tokens, checked against the model's context with the longest prompt; None: the rest of the
    context after it (chat's default, as OpenAI's and vLLM's). A 400 when they do not fit, with
    OpenAI's code on both endpoints."""
    context = getattr(pipeline, "context_length", None)
    if context is None:
        return max_tokens or DEFAULT_MAX_TOKENS
    prompt_tokens = max(len(model.tokenizer(prompt)["input_ids"]) for prompt in prompts)
    if prompt_tokens + (max_tokens or 1) > context:
        what = "the prompt" if param == "prompt" else "the messages"
        asked = f" plus max_tokens ({max_tokens})" if max_tokens else ""
        raise APIError(400, f"{what} ({prompt_tokens} tokens){asked} exceed the model's context of {context} tokens; "
                       f"shorten {what}{' or lower max_tokens' if max_tokens else ''}", param=param,
                       code="context_length_exceeded")
    return max_tokens or context - prompt_tokens


@contextlib.asynccontextmanager
async def _stop_if_client_leaves(request: Request, stop: threading.Event):
    """While the block waits for the model, a client that disconnects sets `stop`: a queued
    generation never starts, a running one ends after its current step. (Once a streamed answer
    has begun, the response's own watch for the disconnect takes over.)"""

    async def watch():
        # the body has been read: the next message the server has for us is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        stop.set()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()


class _ContainErrors:
    """ASGI middleware: an unexpected exception (a bug) becomes a 500 in OpenAI's shape, and the
    connection stays usable. Left to Starlette, the error is re-raised to the server once the 500
    is sent, and uvicorn then drops the client's keep-alive connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as error:
            if started:  # too late for an answer of its own: the server closes the connection
                raise
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            response = JSONResponse(APIError(500, f"internal error: {error}").body(), status_code=500)
            await response(scope, receive, send)
