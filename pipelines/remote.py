"""The remote lane: the LLM lane's token events from any OpenAI-compatible server (vLLM, TGI,
llama.cpp's server, another studio's `studio serve --api`), so that a model too big for this
machine shows in the same view as a local one.

    llm = RemoteTextGeneration("http://gpu-box:8000/v1", "Qwen/Qwen2.5-72B-Instruct")
    llm = RemoteTextGeneration.from_url("http://gpu-box:8000/v1#Qwen/Qwen2.5-72B-Instruct")
    llm = remote_from_env()          # from STUDIO_REMOTE_LLM; None when it is not set
    for ev in llm.stream("The cat sat", max_new_tokens=16, top_logprobs=5):
        print(ev.phase, ev.text, ev.top, ev.ms)

It streams `/v1/completions` (`/v1/chat/completions` with chat=True) with logprobs, and turns each
token the server sends into a TokenStep: phase "prefill" for the first token, "decode" after; `top`
from the server's top_logprobs, as probabilities. `ms` is wall-clock time: how long this client
waited for the token, network and the server's queue included, since a server's device time is
not visible from outside. `timing_kind = "wall-clock"` says so (the local lane measures device time).

What an OpenAI-compatible server does not send stays empty: token ids (None; tokens are known by
their text), the prompt's tokens (so there is no "tokenize" event), the distribution after the
sampling processors, FLOPs, shapes and KV-cache bytes.

Not every server does all it is asked. One that ignores `stream: true` (llama.cpp's server in the
cyllama wheel answers one JSON object) is read as a whole answer: its tokens arrive together, the
first carrying the wait. One that sends no log-probabilities gives events with the text alone.
Each is said once per RemoteTextGeneration, in `notes` and as a logged warning; a 404 on
/v1/completions suggests chat=True (some servers serve only chat).

Depends on httpx, the studio core's timer and the LLM lane's event and sampling types; never on Gradio.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping

import httpx

from studio.profiling import StepTimer
from studio.values import lone_surrogate

from .generation import GenerationOutput, TokenStep
from .sampling import SamplingSettings

# The one place the app learns of a remote model: "<base URL>#<model>", for example
# STUDIO_REMOTE_LLM=http://gpu-box:8000/v1#Qwen/Qwen2.5-72B-Instruct. Without "#<model>" the
# server's first model is used. The API key, where the server wants one, comes from ENV_API_KEY.
ENV_URL = "STUDIO_REMOTE_LLM"
ENV_API_KEY = "STUDIO_REMOTE_LLM_API_KEY"

# What a server leaves out, said once (RemoteTextGeneration.notes)
NO_LOGPROBS = "this server returns no log-probabilities: alternatives stay empty"
NO_STREAM = "this server does not stream: each answer arrives whole, its tokens together"

log = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """The server could not be reached, or failed (HTTP 5xx). A request it refused (4xx) raises ValueError."""


def remote_from_env(environ: Mapping[str, str] = os.environ) -> "RemoteTextGeneration | None":
    """The remote lane the operator configured in STUDIO_REMOTE_LLM, or None. Nothing is fetched yet."""
    url = environ.get(ENV_URL, "").strip()
    if not url:
        return None
    return RemoteTextGeneration.from_url(url, api_key=environ.get(ENV_API_KEY) or None)


class RemoteTextGeneration:
    """A TextGenerationPipeline's stream() and __call__ over an OpenAI-compatible server."""

    timing_kind = "wall-clock"

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        """base_url: the API root, e.g. http://host:8000/v1. model: as the server names it; None asks
        the server (GET /models) on first use and takes its first. timeout: seconds to wait for each token."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the remote LLM's URL must start with http:// or https://; got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.notes: list[str] = []  # what this server leaves out (NO_LOGPROBS, NO_STREAM), each once

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None, timeout: float = 120.0) -> "RemoteTextGeneration":
        """From "<base URL>#<model>" (the model part may be left out), the form STUDIO_REMOTE_LLM takes."""
        base_url, _, model = url.partition("#")
        return cls(base_url, model or None, api_key, timeout)

    def list_models(self) -> list[str]:
        """The model names the server offers."""
        with self._client() as client:
            response = self._send(client, "GET", "/models")
            return [entry["id"] for entry in response.json()["data"]]

    # -----------------------------------------------------------------------------------------
    # The public API, as the local lane's

    def __call__(self, prompt: str | list[str], **kwargs) -> GenerationOutput | list[GenerationOutput]:
        batch = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = [[] for _ in batch]
        for event in self.stream(prompt, **kwargs):
            steps[event.sequence].append(event)
        outputs = [
            GenerationOutput(
                text="".join(e.text for e in events),
                token_ids=[e.token_id for e in events],  # None each: the server names tokens by their text
                steps=events,
                finish_reason=next((e.finish_reason for e in reversed(events) if e.finish_reason), "stopped"),
            )
            for events in steps
        ]
        return outputs[0] if isinstance(prompt, str) else outputs

    def stream(
        self,
        prompt: str | list[str],
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int = 0,
        use_cache: bool = True,
        top_logprobs: int = 5,
        stop: list[str] | str | None = None,
        chat: bool = False,
        speculative: str | None = None,
        draft=None,
        num_draft_tokens: int = 4,
        stop_event: threading.Event | None = None,
        fast_path: bool | None = None,
    ) -> Iterator[TokenStep]:
        """Yield a TokenStep for every token the server streams (see the module's notes for what
        differs from the local lane). use_cache, speculative decoding and the fast path are the
        server's business: only their defaults are accepted. Stop between tokens by closing the
        generator or setting stop_event; the connection is closed either way, which tells the
        server to stop too."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self._check_request(prompts, stops, max_new_tokens, top_logprobs, use_cache, speculative, fast_path, chat)
        SamplingSettings(temperature, top_k, top_p, min_p, repetition_penalty, seed)  # same checks as the local lane
        path, body = self._request_body(
            prompts, chat, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
            top_logprobs, stops,
        )

        try:
            with self._client() as client, client.stream("POST", self.base_url + path, json=body) as response:
                self._raise_for_status(response, path)
                yield from self._token_events(self._chunks(response, chat), chat, stops, top_logprobs, stop_event)
        except httpx.TransportError as error:  # refused, timed out, or cut off mid-stream
            raise RemoteError(f"lost the remote LLM at {self.base_url}: {error}") from error

    def _token_events(self, chunks, chat, stops, top_logprobs, stop_event) -> Iterator[TokenStep]:
        """The chunks as token events, one per token, in the order they came."""
        # A token's event is held until the next chunk arrives: some servers send the finish reason
        # in a chunk of its own, and the local lane puts it on the last token's event.
        pending: dict[int, TokenStep] = {}
        counts: dict[int, int] = {}
        timer = StepTimer("cpu")  # this client's clock: the wall-clock time each token took to arrive
        received = 0
        while True:
            with timer.time() as timing:
                chunk = next(chunks, None)
            if chunk is None:
                break
            received += 1
            for choice in chunk.get("choices") or []:
                sequence = choice.get("index", 0)
                text, tokens = _chat_tokens(choice) if chat else _completion_tokens(choice)
                if text and not tokens:  # a server that sends no logprobs: the text alone
                    self._note(NO_LOGPROBS)
                    tokens = [(text, None, [])]
                # several tokens in one chunk: each its own text where they add up to the chunk's,
                # else the chunk's text on the last (a held-back stop string, an incomplete character)
                texts = [token for token, _, _ in tokens]
                split = all(isinstance(t, str) for t in texts) and "".join(texts) == text
                events = []
                for k, (token, logprob, top) in enumerate(tokens):
                    index = counts.get(sequence, 0)
                    counts[sequence] = index + 1
                    events.append(TokenStep(
                        phase="prefill" if index == 0 else "decode", index=index, sequence=sequence,
                        timing=timing if k == 0 else None,  # tokens that arrived together: the first carries the wait
                        text=token if split else text if k == len(tokens) - 1 else "",
                        logprob=logprob, top=_as_probabilities(top, top_logprobs),
                    ))
                if events:
                    if sequence in pending:
                        yield pending.pop(sequence)
                    yield from events[:-1]
                    pending[sequence] = events[-1]
                if choice.get("finish_reason") and sequence in pending:
                    event = pending.pop(sequence)
                    event.finish_reason = _finish_reason(choice, stops)
                    yield event
            if stop_event is not None and stop_event.is_set():
                break
        if not received:
            raise RemoteError(f"the remote LLM at {self.base_url} answered without a completion: an empty stream")
        yield from pending.values()  # stopped early, or a server that never said why it finished

    def _chunks(self, response: httpx.Response, chat: bool) -> Iterator[dict]:
        """The answer's chunks: server-sent events as they come, or a server that does not stream
        read whole, as one chunk of the stream's shape (a chat message as its delta)."""
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            yield from _sse_chunks(response.iter_lines())
            return
        text = response.read().decode(errors="replace")
        if text.lstrip().startswith("data:"):  # a stream after all, labelled otherwise
            yield from _sse_chunks(text.splitlines())
            return
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
            raise RemoteError(
                f"the remote LLM at {self.base_url} does not stream, and its answer is not an OpenAI completion "
                f"either ({response.headers.get('content-type') or 'no Content-Type'}): {text.strip()[:200]!r}"
            )
        self._note(NO_STREAM)
        if chat:
            answer["choices"] = [{**c, "delta": c.get("message") or {}} for c in answer["choices"] if isinstance(c, dict)]
        yield answer

    def _note(self, note: str) -> None:
        """Say once what this server leaves out."""
        if note not in self.notes:
            self.notes.append(note)
            log.warning("the remote LLM at %s: %s", self.base_url, note)

    # -----------------------------------------------------------------------------------------
    # HTTP

    def _client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout, connect=10.0))

    def _send(self, client: httpx.Client, method: str, path: str) -> httpx.Response:
        try:
            response = client.request(method, self.base_url + path)
        except httpx.TransportError as error:
            raise RemoteError(f"could not reach the remote LLM at {self.base_url}: {error}") from error
        self._raise_for_status(response, path)
        return response

    def _raise_for_status(self, response: httpx.Response, path: str) -> None:
        if response.status_code < 400:
            return
        response.read()
        try:
            message = response.json()["error"]["message"]  # OpenAI's error object
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()[:500] or response.reason_phrase
        said = f"the remote LLM at {self.base_url} answered {response.status_code} on {path}: {message}"
        if response.status_code == 404 and path == "/completions" and (self.model or "") not in message:
            # not "no such model" (servers name the model then): no such endpoint
            said += "; this server may serve only chat: try chat=True (/chat/completions)"
        raise ValueError(said) if response.status_code < 500 else RemoteError(said)

    def _request_body(self, prompts, chat, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                      seed, top_logprobs, stops) -> tuple[str, dict]:
        body = {"model": self.model or self._first_model(), "max_tokens": max_new_tokens,
                "temperature": temperature, "seed": seed, "stream": True}
        # the sampling extras go only when set: vLLM knows them, OpenAI refuses them
        extras = {"top_p": top_p, "top_k": top_k, "min_p": min_p, "repetition_penalty": repetition_penalty,
                  "stop": stops or None}
        body.update({name: value for name, value in extras.items() if value is not None})
        if chat:
            body.update(messages=[{"role": "user", "content": prompts[0]}], logprobs=True, top_logprobs=top_logprobs)
            return "/chat/completions", body
        body.update(prompt=prompts[0] if len(prompts) == 1 else prompts, logprobs=top_logprobs)
        return "/completions", body

    def _first_model(self) -> str:
        models = self.list_models()
        if not models:
            raise RemoteError(f"the remote LLM at {self.base_url} lists no models")
        self.model = models[0]
        return self.model

    @staticmethod
    def _check_request(prompts, stops, max_new_tokens, top_logprobs, use_cache, speculative, fast_path, chat):
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise ValueError("the prompt is empty; type some text to continue")
        for what, texts in (("prompt", prompts), ("stop string", stops)):
            for text in texts:
                if not isinstance(text, str):
                    raise ValueError(f"a {what} must be a string; got {text!r}")
                at = lone_surrogate(text)
                if at is not None:  # JSON cannot carry it to the server
                    raise ValueError(f"the {what} holds a lone surrogate (U+{ord(text[at]):04X}), half of "
                                     "a character, which is not valid Unicode")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens}")
        if not isinstance(top_logprobs, int) or top_logprobs < 0:
            raise ValueError(f"top_logprobs must be an integer >= 0; got {top_logprobs}")
        if not use_cache:
            raise ValueError("a remote server always decodes with its KV cache; use_cache=False runs only locally")
        if speculative is not None:
            raise ValueError("speculative decoding on a remote model is the server's setting, not the request's")
        if fast_path:
            raise ValueError("the fast path runs on this machine's GPU; a remote server has its own")
        if chat and len(prompts) > 1:
            raise ValueError("a chat request carries one conversation; send the prompts one at a time")


# ---------------------------------------------------------------------------------------------
# The server's JSON -> the lane's values


def _sse_chunks(lines) -> Iterator[dict]:
    """The JSON payloads of a server-sent event stream's lines, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):  # blank separators, ": ping" comments, event names
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise RemoteError(f"the remote LLM sent a chunk that is not JSON: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            raise RemoteError(f"the remote LLM sent a chunk that is not a JSON object: {data[:200]!r}")
        if "error" in chunk:  # a failure after the response began travels in the stream
            error = chunk["error"]
            raise RemoteError(f"the remote LLM failed mid-stream: {error.get('message', error)}")
        yield chunk


# per token: (its text, its logprob, [(text, logprob)] of its alternatives)
Tokens = list[tuple[str | None, float | None, list[tuple[str, float]]]]


def _completion_tokens(choice: dict) -> tuple[str, Tokens]:
    """A /v1/completions chunk's (or whole answer's) text and tokens. The alternatives come as a
    dict keyed by text: tokens that decode alike (bytes of one character, each shown as U+FFFD)
    arrive as one."""
    logprobs = choice.get("logprobs") or {}
    token_logprobs = logprobs.get("token_logprobs") or []
    texts = logprobs.get("tokens") or [None] * len(token_logprobs)
    tops = logprobs.get("top_logprobs") or [None] * len(token_logprobs)
    tokens = [(text, lp, list((top or {}).items())) for text, lp, top in zip(texts, token_logprobs, tops)]
    return choice.get("text") or "", tokens


def _chat_tokens(choice: dict) -> tuple[str, Tokens]:
    """A /v1/chat/completions chunk's text and tokens (a whole answer's message comes as its delta)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    tokens = [
        (entry.get("token"), entry.get("logprob"), [(a["token"], a["logprob"]) for a in entry.get("top_logprobs") or []])
        for entry in content
    ]
    return (choice.get("delta") or {}).get("content") or "", tokens


def _as_probabilities(top: list[tuple[str, float]], n: int) -> list[tuple[str, None, float]]:
    """The n likeliest alternatives as the local lane's (text, id, probability); ids are unknown.
    vLLM adds the chosen token when it is not among the top n: the cut drops it again."""
    ranked = sorted(top, key=lambda item: item[1], reverse=True)[:n]
    return [(text, None, math.exp(logprob)) for text, logprob in ranked]


def _finish_reason(choice: dict, stops: list[str]) -> str:
    """OpenAI's finish reason -> the local lane's "eos" | "stop" | "length"."""
    finish = choice["finish_reason"]
    if finish != "stop":
        return finish  # "length", or one the server names itself (e.g. "content_filter")
    if "stop_reason" in choice:  # vLLM (and `studio serve`) say which: a stop string, or null for end of sequence
        return "stop" if isinstance(choice["stop_reason"], str) else "eos"
    return "stop" if stops else "eos"  # a server that does not say: a guess, right unless both could have happened
