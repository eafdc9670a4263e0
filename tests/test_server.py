"""The OpenAI-compatible API (studio/server.py) and the remote lane (pipelines/remote.py): the
`openai` client against our endpoint, the remote lane against our endpoint and (opt-in) against
llama.cpp's server, bad input, and slow or departing clients beside others. A real uvicorn server
runs on a free local port with tiny random models and the offline byte tokenizer.

Nothing here asserts a wall-clock time: what ran, and in which order, is read from the slow
pipeline's own log of its steps (`Paced`)."""

import asyncio
import gc
import json
import math
import os
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving import serving
from tiny_models import byte_tokenizer, tiny_llm

from pipelines.remote import RemoteError, RemoteTextGeneration, remote_from_env
from pipelines.text_generation import TextGenerationPipeline
from studio.server import _Generation, create_api

PROMPT = "The cat sat on the mat. The cat sat"
SLOW_STEP_S = 0.05  # the slow pipeline's extra time per step: a long generation in little test time
DOG = "A dog"  # a prompt of 5 byte tokens, told apart from PROMPT's 35


def broken_loader():
    raise OSError("no weights here")


class Buggy:
    """A pipeline with a bug the server does not expect: reading its context length fails."""

    tokenizer = None

    def stream(self, *args, **kwargs):
        raise AssertionError("never reached")

    @property
    def context_length(self):
        raise RuntimeError("a bug")


class Paced(TextGenerationPipeline):
    """The slow pipeline: each step of its stream waits SLOW_STEP_S, and is logged, so a test reads
    what ran and in which order: the prompts it began (their lengths in bytes) and the tokens it
    made. Paced at the lane's events, whichever loop (plain or fast path) makes them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, int]] = []  # ("prompt", its length) or ("token", 1)

    def stream(self, *args, **kwargs):
        return self._paced(super().stream(*args, **kwargs))  # a bad request fails here, as the lane's own

    def _paced(self, events):
        try:
            for event in events:
                time.sleep(SLOW_STEP_S)
                self.log.append(("prompt", len(event.token_ids)) if event.phase == "tokenize" else ("token", 1))
                yield event
        finally:
            events.close()

    def since(self, start: int) -> tuple[list[int], int]:
        """From log entry `start` on: the prompts begun (their lengths), and how many tokens were made."""
        entries = self.log[start:]
        return [n for kind, n in entries if kind == "prompt"], sum(1 for kind, _ in entries if kind == "token")


@pytest.fixture(scope="module")
def llm():
    return TextGenerationPipeline(tiny_llm("llama"), byte_tokenizer())


@pytest.fixture(scope="module")
def slow():
    slow = Paced(tiny_llm("llama", seed=1), byte_tokenizer())
    # the counts below mean something only if greedy decoding runs to the token limit
    assert slow(PROMPT, max_new_tokens=100).finish_reason == "length"
    return slow


@pytest.fixture(scope="module")
def base_url(llm, slow):
    lazy = lambda: TextGenerationPipeline(tiny_llm("gpt2"), byte_tokenizer())  # noqa: E731
    api = create_api({"tiny": llm, "tiny-slow": slow, "tiny-lazy": lazy, "broken": broken_loader,
                      "buggy": Buggy()})
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
    assert {m.id for m in client.models.list()} == {"tiny", "tiny-slow", "tiny-lazy", "broken", "buggy"}
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
DEEP = "[" * 100_000 + "]" * 100_000
HUGE_NUMBER = "9" * 4301  # one digit more than Python converts to an int
SURROGATE = r'"abc \ud800"'  # a lone surrogate: half a character, as JSON can escape it
CHAT = '"messages": [{"role": "user", "content": "x"}]'


def bad(path, fields, status, param, code=None, says="", id=None):
    """One bad request: `fields` is the JSON body after the model's name."""
    return pytest.param(path, f'{{"model": "tiny", {fields}}}', status, param, code, says, id=id)


BAD_INPUT = [
    pytest.param("/completions", '{"model": "tiny", "prompt": ', 400, None, "invalid_json", "", id="malformed-json"),
    pytest.param("/completions", DEEP, 400, None, "invalid_json", "deeper", id="nested-100000-deep"),
    bad("/completions", f'"prompt": {DEEP}', 400, None, "invalid_json", "deeper", id="prompt-nested-100000-deep"),
    bad("/completions", f'"prompt": "x", "max_tokens": {HUGE_NUMBER}', 400, None, "invalid_json", "4301 digits",
        id="4301-digit-number"),
    bad("/completions", '"prompt": "x", "repetition_penalty": Infinity', 400, None, "invalid_json", "Infinity",
        id="infinity"),
    bad("/completions", '"prompt": "x", "temperature": NaN', 400, None, "invalid_json", "NaN", id="nan"),
    bad("/completions", '"prompt": "x", "repetition_penalty": 1e999', 400, "repetition_penalty", None, "finite",
        id="overflowing-float"),
    bad("/completions", f'"prompt": {SURROGATE}', 400, "prompt", "invalid_unicode", "surrogate",
        id="lone-surrogate"),
    bad("/completions", f'"prompt": {SURROGATE}, "stream": true', 400, "prompt", "invalid_unicode", "surrogate",
        id="lone-surrogate-streamed"),
    bad("/completions", f'"prompt": ["x", {SURROGATE}]', 400, "prompt", "invalid_unicode", r"prompt\[1\]",
        id="lone-surrogate-in-a-list"),
    bad("/completions", f'"prompt": "x", "stop": {SURROGATE}', 400, "stop", "invalid_unicode", id="lone-surrogate-stop"),
    bad("/completions", r'"prompt": "x", "\udfff": 1', 400, None, "invalid_unicode", "field name",
        id="lone-surrogate-field-name"),
    pytest.param("/completions", '{"model": "nope", "prompt": "x"}', 404, "model", "model_not_found", "",
                 id="unknown-model"),
    bad("/completions", f'"prompt": "{LONG}"', 400, "prompt", "context_length_exceeded", "300 tokens",
        id="over-long-prompt"),
    bad("/completions", '"prompt": "x", "max_tokens": 256', 400, "prompt", "context_length_exceeded",
        id="too-many-tokens"),
    bad("/completions", '"prompt": "x", "n": 2', 400, "n", "unsupported_parameter", id="n"),
    bad("/completions", '"prompt": "x", "echo": true', 400, "echo", "unsupported_parameter", id="echo"),
    bad("/completions", '"prompt": "x", "tools": []', 400, "tools", "unsupported_parameter", id="unknown-field"),
    bad("/completions", '"prompt": "x", "max_tokens": 0', 400, "max_tokens", id="max-tokens-0"),
    bad("/completions", '"prompt": "x", "max_tokens": "8"', 400, "max_tokens", says="integer", id="max-tokens-string"),
    bad("/completions", '"prompt": "x", "max_tokens": true', 400, "max_tokens", says="integer", id="max-tokens-true"),
    bad("/completions", '"prompt": "x", "max_tokens": 2.0', 400, "max_tokens", says="integer", id="max-tokens-float"),
    bad("/completions", '"prompt": "x", "logprobs": true', 400, "logprobs", says="integer", id="logprobs-true"),
    bad("/completions", '"prompt": "x", "logprobs": 50', 400, "logprobs", id="too-many-logprobs"),
    bad("/completions", '"prompt": "x", "stream": "yes"', 400, "stream", says="boolean", id="stream-yes"),
    bad("/completions", '"prompt": "x", "stream_options": {"include_usage": true}', 400, "stream_options",
        says="stream", id="stream-options-without-stream"),
    bad("/completions", '"prompt": [1, 2, 3]', 400, "prompt", says="list of strings", id="token-ids"),
    bad("/completions", '"prompt": "x", "stop": [""]', 400, "stop", id="empty-stop"),
    pytest.param("/completions", '["not", "an", "object"]', 400, None, None, "object", id="body-a-list"),
    pytest.param("/completions", '{"model": "broken", "prompt": "x"}', 500, None, "model_load_failed", "",
                 id="model-fails-to-load"),
    pytest.param("/completions", '{"model": "buggy", "prompt": "x"}', 500, None, None, "internal error: a bug",
                 id="a-bug"),
    bad("/chat/completions", '"messages": []', 400, "messages", id="no-messages"),
    bad("/chat/completions", f'"messages": [{{"role": "user", "content": "{LONG}"}}]', 400, "messages",
        "context_length_exceeded", id="over-long-chat"),
    bad("/chat/completions", f'{CHAT}, "max_tokens": 256', 400, "messages", "context_length_exceeded",
        id="too-many-chat-tokens"),
    bad("/chat/completions", f'{CHAT}, "top_logprobs": 2', 400, "top_logprobs", id="top-logprobs-without-logprobs"),
    bad("/chat/completions", f'"messages": [{{"role": "user", "content": {SURROGATE}}}]', 400, "messages",
        "invalid_unicode", r"messages\[0\]\.content", id="chat-lone-surrogate"),
    bad("/chat/completions", f'"messages": [{{"role": "user", "content": {SURROGATE}}}], "stream": true', 400,
        "messages", "invalid_unicode", id="chat-lone-surrogate-streamed"),
    bad("/chat/completions", '"messages": [{"role": "user", "content": "x", "tool_calls": []}]', 400,
        "messages[0].tool_calls", "unsupported_parameter", r"'messages\[0\]\.tool_calls' is not supported",
        id="unknown-field-in-a-message"),
    bad("/chat/completions", '"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]',
        400, "messages", says="only text", id="image-part"),
    bad("/chat/completions", f'{CHAT}, "stream": "yes"', 400, "stream", id="chat-stream-yes"),
]


@pytest.mark.parametrize("path, body, status, param, code, says", BAD_INPUT)
def test_bad_input_gets_an_openai_error_and_the_connection_keeps_serving(base_url, path, body, status, param, code,
                                                                         says):
    with httpx.Client(timeout=30) as client:
        response = client.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status
        error = response.json()["error"]
        assert error["message"] and error["type"] == ("invalid_request_error" if status < 500 else "server_error")
        assert (error["param"], error["code"]) == (param, code)
        assert re.search(says, error["message"]), error["message"]
        # the same keep-alive connection answers the next request
        following = client.get(f"{base_url}/models")
        assert following.status_code == 200
        assert local_port(following) == local_port(response)


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]


def test_the_client_raises_openais_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=LONG)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=1).choices


# ---------------------------------------------------------------------------------------------
# One slow client, or one long generation, does not hold up the others


def slow_request(base_url, prompt, max_tokens, **fields) -> dict:
    body = {"model": "tiny-slow", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **fields}
    return httpx.post(f"{base_url}/completions", json=body, timeout=60).json()


def test_a_long_generation_leaves_the_server_responsive(base_url, slow):
    tokens = 40
    start = len(slow.log)
    body = {"model": "tiny-slow", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as slow_client, slow_client.stream("POST", f"{base_url}/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # it has begun
        assert httpx.get(f"{base_url}/models").status_code == 200
        # a request for another model runs beside it, and ends first
        out = httpx.post(f"{base_url}/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4}).json()
        assert out["usage"]["completion_tokens"] >= 1
        assert slow.since(start)[1] < tokens  # the long one has not finished yet
        assert sum(1 for line in lines if line.startswith("data:")) >= 2  # the rest of it, and [DONE]
    assert slow.since(start)[1] == tokens


def test_a_streaming_client_that_leaves_frees_the_model(base_url, slow):
    tokens = 100
    start = len(slow.log)
    body = {"model": "tiny-slow", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as leaving, leaving.stream("POST", f"{base_url}/completions", json=body) as stream:
        next(stream.iter_lines())
    assert slow_request(base_url, DOG, 1)["usage"]["completion_tokens"] == 1
    prompts, made = slow.since(start)
    assert prompts == [len(PROMPT), len(DOG)]  # the next request ran after the first had stopped
    assert made - 1 < tokens // 2  # ... early


def test_a_client_that_leaves_before_its_answer_frees_the_model(base_url, slow):
    """Not streamed: the client gives up waiting for the whole answer (curl -m 2)."""
    tokens = 100
    start = len(slow.log)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/completions", timeout=httpx.Timeout(30, read=0.5),
                   json={"model": "tiny-slow", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0})
    assert slow_request(base_url, DOG, 1)["usage"]["completion_tokens"] == 1
    prompts, made = slow.since(start)
    assert prompts == [len(PROMPT), len(DOG)]
    assert made - 1 < tokens // 2


def test_a_queued_request_whose_client_left_never_runs(base_url, slow):
    tokens = 30
    start = len(slow.log)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(slow_request, base_url, PROMPT, tokens)
        while len(slow.log) == start:  # the model is busy with the first: the next request queues
            assert first.running(), first.result()
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/completions", timeout=httpx.Timeout(30, read=0.3),
                       json={"model": "tiny-slow", "prompt": "Queued, then gone", "max_tokens": 5})
        assert first.result()["usage"]["completion_tokens"] == tokens
    assert slow_request(base_url, DOG, 1)["usage"]["completion_tokens"] == 1
    assert slow.since(start)[0] == [len(PROMPT), len(DOG)]  # the abandoned one never reached the model
    assert generations_alive() == 0  # and its handler did not go on waiting for tokens


def generations_alive() -> int:
    gc.collect()  # a finished generation and its task refer to each other
    return sum(1 for o in gc.get_objects() if type(o) is _Generation)  # type(): isinstance() asks deprecated objects for __class__


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


def test_the_remote_lane_stops_when_asked(base_url, slow):
    tokens = 40
    start = len(slow.log)
    remote = RemoteTextGeneration(base_url, "tiny-slow")
    stop = threading.Event()
    events = []
    for event in remote.stream(PROMPT, max_new_tokens=tokens, stop_event=stop):
        events.append(event)
        stop.set()
    assert len(events) <= 3  # the one asked for, and what had already arrived
    assert slow_request(base_url, DOG, 1)["usage"]["completion_tokens"] == 1
    prompts, made = slow.since(start)
    assert prompts == [len(PROMPT), len(DOG)] and made - 1 < tokens // 2  # the server stopped too


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
