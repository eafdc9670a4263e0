"""The OpenAI-compatible API (studio/server.py) and the remote lane (pipelines/remote.py): the
`openai` client against our endpoint, the remote lane against our endpoint and (opt-in) against
llama.cpp's server, bad input, and a slow client beside others. A real uvicorn server runs on a
free local port with tiny random models and the offline byte tokenizer."""

import asyncio
import contextlib
import json
import math
import os
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from tiny_models import byte_tokenizer, tiny_llm

from pipelines.remote import RemoteError, RemoteTextGeneration, remote_from_env
from pipelines.text_generation import TextGenerationPipeline
from studio.server import create_api

PROMPT = "The cat sat on the mat. The cat sat"
SLOW_FORWARD_S = 0.05  # the slow model's extra time per forward pass: a long generation in little test time


@contextlib.contextmanager
def serving(api):
    """Run `api` with uvicorn on a free port in a background thread; yields the /v1 base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def broken_loader():
    raise OSError("no weights here")


@pytest.fixture(scope="module")
def llm():
    return TextGenerationPipeline(tiny_llm("llama"), byte_tokenizer())


@pytest.fixture(scope="module")
def base_url(llm):
    slow = TextGenerationPipeline(tiny_llm("llama", seed=1), byte_tokenizer())
    slow.model.register_forward_pre_hook(lambda *args: time.sleep(SLOW_FORWARD_S))
    lazy = lambda: TextGenerationPipeline(tiny_llm("gpt2"), byte_tokenizer())  # noqa: E731
    api = create_api({"tiny": llm, "tiny-slow": slow, "tiny-lazy": lazy, "broken": broken_loader})
    with serving(api) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=60)


def token_events(llm, prompt, **kwargs):
    return [e for e in llm.stream(prompt, **kwargs) if e.phase != "tokenize"]


def assert_top_logprobs_match(top_logprobs: dict, event):
    """vLLM's dict keyed by token text: each of the event's alternatives, the likelier one where two share a text."""
    assert set(top_logprobs) == {text for text, _, _ in event.top}
    for text, _, prob in event.top:
        assert top_logprobs[text] >= math.log(prob) - 1e-9
    for text, logprob in top_logprobs.items():
        assert logprob == pytest.approx(math.log(max(p for t, _, p in event.top if t == text)), abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Our endpoint, through the official client


def test_completion_logprobs_equal_the_pipelines_own(client, llm):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=5)
    events = token_events(llm, PROMPT, max_new_tokens=8, top_logprobs=5)
    choice = out.choices[0]
    assert choice.text == llm(PROMPT, max_new_tokens=8).text
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[events[-1].finish_reason]
    logprobs = choice.logprobs
    assert logprobs.token_logprobs == [e.logprob for e in events]
    assert logprobs.tokens == [llm.tokenizer.decode([e.token_id]) for e in events]
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(events))]
    for top, event in zip(logprobs.top_logprobs, events):
        assert_top_logprobs_match(top, event)
    prompt_tokens = len(llm.tokenizer(PROMPT)["input_ids"])
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, len(events))


def test_streamed_completion_equals_the_non_streamed(client):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    tokens = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in tokens) == whole.text
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [value for c in tokens for value in getattr(c.choices[0].logprobs, name)]
        assert streamed == getattr(whole.logprobs, name)
    assert tokens[-1].choices[0].finish_reason == whole.finish_reason
    assert all(c.choices[0].finish_reason is None for c in tokens[:-1])
    assert chunks[-1].usage.completion_tokens == len(whole.logprobs.tokens)


def test_sampling_follows_the_seed_as_the_pipeline_does(client, llm):
    kwargs = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    first = client.completions.create(model="tiny", prompt=PROMPT, **kwargs).choices[0].text
    assert client.completions.create(model="tiny", prompt=PROMPT, **kwargs).choices[0].text == first
    assert first == llm(PROMPT, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7).text


def test_a_stop_string_ends_the_completion_and_is_named(client, llm):
    greedy = llm(PROMPT, max_new_tokens=12).text
    stop = greedy[3:5]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    local = llm(PROMPT, max_new_tokens=12, stop=[stop])
    assert out.choices[0].text == local.text == greedy[: greedy.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop


def test_a_list_of_prompts_gives_one_choice_each(client, llm):
    prompts = [PROMPT, "A dog"]
    out = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [o.text for o in llm(prompts, max_new_tokens=6)]


def test_chat_completion_matches_the_pipelines_chat(client, llm):
    messages = [{"role": "user", "content": "Hi there"}]
    kwargs = dict(model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    out = client.chat.completions.create(**kwargs)
    events = token_events(llm, "Hi there", chat=True, max_new_tokens=6, top_logprobs=3)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == llm("Hi there", chat=True, max_new_tokens=6).text
    content = out.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == [e.logprob for e in events]
    for entry, event in zip(content, events):
        assert entry.token == llm.tokenizer.decode([event.token_id])
        assert entry.bytes == list(entry.token.encode())
        assert [(a.token, a.logprob) for a in entry.top_logprobs] == [
            (text, pytest.approx(math.log(prob), abs=1e-9)) for text, _, prob in event.top
        ]

    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    streamed = [entry for c in chunks if c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_models_lists_what_is_served(client):
    assert {m.id for m in client.models.list()} == {"tiny", "tiny-slow", "tiny-lazy", "broken"}
    assert client.models.retrieve("tiny").id == "tiny"


def test_a_lazy_model_loads_on_its_first_request(client):
    out = client.completions.create(model="tiny-lazy", prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_curl_without_a_content_type_gets_eight_alternatives(base_url):
    # curl -d sends application/x-www-form-urlencoded; the body is JSON all the same
    body = '{"model":"tiny","prompt":"Kubernetes pods are scheduled by the","max_tokens":1,"logprobs":8}'
    response = httpx.post(f"{base_url}/completions", content=body,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200
    logprobs = response.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 1
    assert 1 <= len(logprobs["top_logprobs"][0]) <= 8  # fewer only where alternatives share a text


# ---------------------------------------------------------------------------------------------
# Bad input: OpenAI's error object, the right status, and the server keeps serving

LONG = "x" * 300  # 300 byte tokens: more than the tiny models' context of 256


@pytest.mark.parametrize(
    "path, body, status, param, code",
    [
        ("/completions", '{"model": "tiny", "prompt": ', 400, None, "invalid_json"),
        ("/completions", '{"model": "nope", "prompt": "x"}', 404, "model", "model_not_found"),
        ("/completions", f'{{"model": "tiny", "prompt": "{LONG}"}}', 400, None, None),
        ("/completions", '{"model": "tiny", "prompt": "x", "n": 2}', 400, "n", "unsupported_parameter"),
        ("/completions", '{"model": "tiny", "prompt": "x", "echo": true}', 400, "echo", "unsupported_parameter"),
        ("/completions", '{"model": "tiny", "prompt": "x", "tools": []}', 400, "tools", "unsupported_parameter"),
        ("/completions", '{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens", None),
        ("/completions", '{"model": "tiny", "prompt": "x", "logprobs": 50}', 400, "logprobs", None),
        ("/completions", '{"model": "tiny", "prompt": [1, 2, 3]}', 400, "prompt", None),
        ("/completions", '{"model": "tiny", "prompt": "x", "stop": [""]}', 400, "stop", None),
        ("/completions", '{"model": "broken", "prompt": "x"}', 500, None, "model_load_failed"),
        ("/chat/completions", '{"model": "tiny", "messages": []}', 400, "messages", None),
        ("/chat/completions", f'{{"model": "tiny", "messages": [{{"role": "user", "content": "{LONG}"}}]}}',
         400, "messages", "context_length_exceeded"),
        ("/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
         400, "top_logprobs", None),
    ],
    ids=["malformed-json", "unknown-model", "over-long-prompt", "n", "echo", "unknown-field", "max-tokens-0",
         "too-many-logprobs", "token-ids", "empty-stop", "model-fails-to-load", "no-messages", "over-long-chat",
         "top-logprobs-without-logprobs"],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(base_url, path, body, status, param, code):
    response = httpx.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert (error["param"], error["code"]) == (param, code)
    assert httpx.get(f"{base_url}/models").status_code == 200


def test_the_client_raises_openais_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=LONG)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices


# ---------------------------------------------------------------------------------------------
# One slow client, or one long generation, does not hold up the others


def test_a_long_generation_leaves_the_server_responsive(base_url):
    tokens = 40  # about 40 * SLOW_FORWARD_S of generation
    body = {"model": "tiny-slow", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as slow_client, slow_client.stream("POST", f"{base_url}/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it has begun
        started = time.monotonic()
        assert httpx.get(f"{base_url}/models").status_code == 200
        assert time.monotonic() - started < tokens * SLOW_FORWARD_S / 2
        # a request for another model runs beside it
        out = httpx.post(f"{base_url}/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4}).json()
        assert out["usage"]["completion_tokens"] >= 1
        assert time.monotonic() - started < tokens * SLOW_FORWARD_S  # the long one has not finished yet
        assert sum(1 for line in lines if line.startswith("data:")) >= 2  # the rest of it, and [DONE]


def test_a_client_that_leaves_frees_the_model(base_url):
    tokens = 100  # about 100 * SLOW_FORWARD_S, were it generated to the end
    body = {"model": "tiny-slow", "prompt": PROMPT, "max_tokens": tokens, "stream": True}
    with httpx.Client(timeout=30) as leaving, leaving.stream("POST", f"{base_url}/completions", json=body) as stream:
        next(stream.iter_lines())
    started = time.monotonic()
    out = httpx.post(f"{base_url}/completions", json={"model": "tiny-slow", "prompt": "A dog", "max_tokens": 1},
                     timeout=30).json()
    assert out["usage"]["completion_tokens"] == 1
    assert time.monotonic() - started < tokens * SLOW_FORWARD_S / 2


def test_a_client_that_stops_reading_does_not_hold_the_model(llm):
    """Straight through ASGI, so that the stalled client is exact: its `send` never returns once
    the answer has begun (over TCP the socket buffers would hide a server that waits for it)."""
    api = create_api({"tiny": llm})

    async def post(body: dict, stalled: asyncio.Event | None = None) -> list[dict]:
        messages, unread = [], [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

        async def receive():
            if unread:
                return unread.pop()
            await asyncio.Event().wait()  # connected for good: never a disconnect

        async def send(message):
            messages.append(message)
            if stalled is not None and message["type"] == "http.response.body":
                stalled.set()
                await asyncio.Event().wait()  # reads nothing more, ever

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "headers": [],
                 "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}
        await api(scope, receive, send)
        return messages

    async def main():
        stalled = asyncio.Event()
        slow = asyncio.create_task(
            post({"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "stream": True}, stalled=stalled)
        )
        await asyncio.wait_for(stalled.wait(), timeout=30)
        try:
            answer = await asyncio.wait_for(post({"model": "tiny", "prompt": "A dog", "max_tokens": 4}), timeout=30)
        finally:
            slow.cancel()
        assert answer[0]["status"] == 200
        assert json.loads(answer[-1]["body"])["usage"]["completion_tokens"] >= 1

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# The remote lane


def test_the_remote_lane_streams_the_local_lanes_tokens(base_url, llm):
    remote = RemoteTextGeneration(base_url, "tiny")
    assert remote.timing_kind == "wall-clock"
    got = list(remote.stream(PROMPT, max_new_tokens=8, top_logprobs=4))
    want = token_events(llm, PROMPT, max_new_tokens=8, top_logprobs=4)
    assert [(e.phase, e.index, e.text, e.logprob, e.finish_reason) for e in got] == [
        (e.phase, e.index, e.text, e.logprob, e.finish_reason) for e in want
    ]
    for remote_event, local_event in zip(got, want):
        # the wire keys alternatives by text: where two share one, the likelier stands for both
        distinct = {}
        for text, _, prob in local_event.top:
            distinct.setdefault(text, prob)
        assert [(t, p) for t, _, p in remote_event.top] == [(t, pytest.approx(p, rel=1e-9)) for t, p in distinct.items()]
        assert remote_event.token_id is None and remote_event.ms > 0
    assert remote(PROMPT, max_new_tokens=8).text == llm(PROMPT, max_new_tokens=8).text


def test_the_remote_lane_chats_and_batches_like_the_local_lane(base_url, llm):
    remote = RemoteTextGeneration(base_url, "tiny")
    got = list(remote.stream("Hi there", chat=True, max_new_tokens=6, top_logprobs=3))
    want = token_events(llm, "Hi there", chat=True, max_new_tokens=6, top_logprobs=3)
    assert [(e.text, e.logprob, e.finish_reason) for e in got] == [(e.text, e.logprob, e.finish_reason) for e in want]
    assert [[t for t, _, _ in e.top] for e in got] == [[t for t, _, _ in e.top] for e in want]
    prompts = [PROMPT, "A dog"]
    assert [o.text for o in remote(prompts, max_new_tokens=5)] == [o.text for o in llm(prompts, max_new_tokens=5)]


def test_the_remote_lane_tells_an_end_of_sequence_from_a_stop_string(base_url, llm):
    greedy = llm(PROMPT, max_new_tokens=12).text
    remote = RemoteTextGeneration(base_url, "tiny")
    assert remote(PROMPT, max_new_tokens=12, stop=[greedy[3:5]]).finish_reason == "stop"
    assert remote(PROMPT, max_new_tokens=2, stop=["never in it"]).finish_reason == "length"


def test_the_remote_lane_stops_when_asked(base_url):
    remote = RemoteTextGeneration(base_url, "tiny-slow")
    stop = threading.Event()
    started = time.monotonic()
    events = []
    for event in remote.stream(PROMPT, max_new_tokens=40, stop_event=stop):
        events.append(event)
        stop.set()
    assert len(events) <= 3  # the one asked for, and what had already arrived
    assert time.monotonic() - started < 40 * SLOW_FORWARD_S / 2


def test_the_remote_lane_is_configured_by_one_variable(base_url):
    assert remote_from_env({}) is None
    remote = remote_from_env({"STUDIO_REMOTE_LLM": f"{base_url}#tiny", "STUDIO_REMOTE_LLM_API_KEY": "k"})
    assert (remote.base_url, remote.model, remote.api_key) == (base_url, "tiny", "k")
    unnamed = remote_from_env({"STUDIO_REMOTE_LLM": base_url})
    assert unnamed.model is None and unnamed(PROMPT, max_new_tokens=1).steps  # the server's first model
    assert unnamed.model == "tiny"


def test_the_remote_lane_reports_refusals_and_unreachable_servers(base_url):
    with pytest.raises(ValueError, match="404"):
        list(RemoteTextGeneration(base_url, "nope").stream(PROMPT))
    with pytest.raises(ValueError, match="use_cache"):
        list(RemoteTextGeneration(base_url, "tiny").stream(PROMPT, use_cache=False))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{unused.getsockname()[1]}/v1"
    with pytest.raises(RemoteError, match="could not reach|lost"):
        list(RemoteTextGeneration(closed, "tiny").stream(PROMPT))


@pytest.mark.skipif(not os.environ.get("STUDIO_LLAMACPP_SERVER"),
                    reason="set STUDIO_LLAMACPP_SERVER=http://127.0.0.1:PORT to a llama.cpp server on the SmolLM2 GGUF")
def test_the_remote_lane_reads_a_llama_cpp_server():
    remote = RemoteTextGeneration(os.environ["STUDIO_LLAMACPP_SERVER"].rstrip("/") + "/v1")
    events = list(remote.stream("Kubernetes pods are scheduled by the", max_new_tokens=8, top_logprobs=5))
    assert [e.phase for e in events] == ["prefill"] + ["decode"] * (len(events) - 1)
    assert events[-1].finish_reason in ("length", "eos")
    for event in events:
        assert len(event.top) == 5 and event.ms > 0
        probs = [p for _, _, p in event.top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert event.logprob <= 0 and event.text == event.top[0][0]  # greedy: the likeliest token
    assert events[0].top[0][0] == " Ku"  # as the local lane on the same weights: " Kubernetes"
    chat = list(remote.stream("What is a pod?", chat=True, max_new_tokens=4, top_logprobs=3))
    assert chat and all(len(e.top) == 3 for e in chat)


# ---------------------------------------------------------------------------------------------
# The shipped model


@pytest.mark.slow
def test_the_shipped_model_answers_the_issues_curl_request():
    body = '{"model":"smollm2-135m","prompt":"Kubernetes pods are scheduled by the","max_tokens":1,"logprobs":8}'
    with serving(create_api()) as url:
        response = httpx.post(f"{url}/completions", content=body, timeout=300)
    assert response.status_code == 200
    logprobs = response.json()["choices"][0]["logprobs"]
    top = logprobs["top_logprobs"][0]
    assert len(top) == 8
    assert max(top, key=top.get) == " Ku"  # the start of " Kubernetes"
    assert logprobs["token_logprobs"][0] <= 0 and sum(math.exp(v) for v in top.values()) <= 1
