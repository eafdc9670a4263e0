"""The API (studio/server.py) under any input and under load.

Any input: every field of either endpoint (and of a chat message) set to each value that has broken
servers before (lone surrogates, NaN, Infinity, huge numbers, wrong types, ...), streamed and not;
then hypothesis draws any JSON for any fields, any JSON as the whole body, any bytes. The answer
is a clear 4xx in OpenAI's shape or a valid answer, never a 500 or a hang, and the keep-alive
connection serves on. Hypothesis is derandomized (every run tries the same examples, none saved)
and draws a hundred examples a test: a tiny random model keeps it to seconds on a 2-core CPU.

Soak: 200 mixed requests from 4 clients at once, some of them leaving mid-way: the server answers
throughout, every answer is its own prompt's (no request sees another's tokens), and nothing a
request held outlives it (no generation, no KV cache, flat memory). About 10 s."""

import gc
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import serving
from tiny_models import byte_tokenizer, tiny_llm
from transformers import DynamicCache

from pipelines.text_generation import TextGenerationPipeline
from studio.bench import malloc_trim, rss_bytes
from studio.server import _Generation, create_api

PROPERTY_SETTINGS = settings(
    max_examples=100, derandomize=True, database=None, deadline=None,  # a loaded 2-core CPU: no per-example deadline
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TIMEOUT = httpx.Timeout(60)  # a hang fails the example rather than the whole run

# Any JSON value: numbers of any size (NaN and Infinity too, as Python writes them), strings with
# any character (lone surrogates too, which json.dumps escapes as "\ud800"), nested lists and
# objects; half the time one of the values that have broken servers before, which random drawing
# alone would rarely hit in a hundred examples.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
EDGES = [
    "abc \ud800", "\udfff", "", " ", "8", "yes", "x" * 300, float("nan"), float("inf"), float("-inf"), 1e308, -0.0,
    2.0, 0.5, True, False, None, 0, -1, 1, 2**63, 10**300, [], {}, [[]], ["a", ""], [1, 2], {"include_usage": True},
    [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Hi", "tool_calls": []}], {"1": 1.0},
]
JSON_VALUES = st.sampled_from(EDGES) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=8,
)
REMOVED = object()  # a field left out

SHARED_FIELDS = ["model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
                 "stop", "stream", "stream_options", "user", "n", "presence_penalty", "frequency_penalty",
                 "logit_bias", "tools", "response_format"]
COMPLETION_FIELDS = SHARED_FIELDS + ["prompt", "logprobs", "echo", "best_of", "suffix"]
CHAT_FIELDS = SHARED_FIELDS + ["messages", "logprobs", "top_logprobs", "max_completion_tokens"]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls"]


@pytest.fixture(scope="module")
def base_url():
    llm = TextGenerationPipeline(tiny_llm("llama"), byte_tokenizer())
    with serving(create_api({"tiny": llm})) as url:
        yield url


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=TIMEOUT) as client:
        yield client


def completion(stream: bool) -> dict:
    return {"model": "tiny", "prompt": "The cat", "max_tokens": 3, "temperature": 0, "stream": stream}


def chat(stream: bool) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
            "stream": stream}


def changed(body: dict, changes: dict) -> dict:
    """The body with some fields replaced or removed; ("messages", name) is a field of the first
    message (applied first: a change of the whole of messages replaces it)."""
    body = json.loads(json.dumps(body))
    for field, value in sorted(changes.items(), key=lambda item: not isinstance(item[0], tuple)):
        where, name = (body["messages"][0], field[1]) if isinstance(field, tuple) else (body, field)
        if value is REMOVED:
            where.pop(name, None)
        else:
            where[name] = value
    return body


def post(client, base_url, path: str, content: bytes | str) -> httpx.Response:
    """POST, read the whole answer (a stream too), and check the answer and the connection after it."""
    response = client.post(base_url + path, content=content, headers={"Content-Type": "application/json"})
    assert_answer(response)
    following = client.get(f"{base_url}/models")  # the same keep-alive connection serves on
    assert following.status_code == 200
    assert local_port(following) == local_port(response)
    return response


def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("socket").getsockname()[1]


def assert_answer(response: httpx.Response, asked: str = "") -> None:
    """A 4xx in OpenAI's shape, or a valid answer: JSON with choices and usage, or a stream of
    JSON chunks that ends in [DONE] with no error in it."""
    assert response.status_code < 500, (asked, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error"
        return
    assert response.status_code == 200
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks and all("choices" in c and "error" not in c for c in chunks)
    else:
        answer = response.json()
        assert answer["choices"] and answer["usage"]["completion_tokens"] >= 0


# ---------------------------------------------------------------------------------------------
# Every field, every value that has broken servers; then any JSON (hypothesis)


@pytest.mark.parametrize("path, base, fields", [
    ("/completions", completion, COMPLETION_FIELDS),
    ("/chat/completions", chat, CHAT_FIELDS + [("messages", f) for f in MESSAGE_FIELDS]),
])
def test_every_field_takes_every_edge_value(base_url, path, base, fields):
    with httpx.Client(timeout=TIMEOUT) as client:
        ports = set()
        for field in fields:
            for value in EDGES + [REMOVED]:
                for stream in (False, True):
                    body = json.dumps(changed(base(stream), {field: value}))
                    response = client.post(base_url + path, content=body, headers={"Content-Type": "application/json"})
                    assert_answer(response, f"{field}={value!r} stream={stream}")
                    ports.add(local_port(response))
        assert len(ports) == 1  # one keep-alive connection served them all


@PROPERTY_SETTINGS
@given(stream=st.booleans(),
       changes=st.dictionaries(st.sampled_from(COMPLETION_FIELDS), JSON_VALUES | st.just(REMOVED), max_size=3))
def test_completions_take_any_json_in_any_field(client, base_url, stream, changes):
    post(client, base_url, "/completions", json.dumps(changed(completion(stream), changes)))


@PROPERTY_SETTINGS
@given(stream=st.booleans(),
       changes=st.dictionaries(st.sampled_from(CHAT_FIELDS + [("messages", f) for f in MESSAGE_FIELDS]),
                               JSON_VALUES | st.just(REMOVED), max_size=3))
def test_chat_takes_any_json_in_any_field(client, base_url, stream, changes):
    post(client, base_url, "/chat/completions", json.dumps(changed(chat(stream), changes)))


@PROPERTY_SETTINGS
@given(path=st.sampled_from(["/completions", "/chat/completions"]), body=JSON_VALUES)
def test_any_json_as_the_body_is_refused_clearly(client, base_url, path, body):
    assert post(client, base_url, path, json.dumps(body)).status_code == 400


@PROPERTY_SETTINGS
@given(path=st.sampled_from(["/completions", "/chat/completions"]), body=st.binary(max_size=40))
def test_any_bytes_as_the_body_are_refused_clearly(client, base_url, path, body):
    assert post(client, base_url, path, body).status_code == 400


# ---------------------------------------------------------------------------------------------
# Soak

SOAK_REQUESTS = 200
SOAK_CLIENTS = 4
# eight prompts whose greedy answers differ from one another (both models, plain and chat): a
# request that got another's tokens would show
PROMPTS = ["The cat sat", "A dog ran", "Once upon a time", "Kubernetes pods", "Hello there", "Seven ships",
           "Quiet night", "Blue whales"]
KINDS = ["completion", "completion-stream", "chat", "chat-stream", "models", "bad", "leave-stream", "leave-waiting"]


def soak_request(client: httpx.Client, base_url: str, i: int, expected: dict) -> str:
    """Request number i: its kind and prompt follow from i (seeded), its answer is checked against
    its own prompt's. Returns the kind, or "left" for a client that left before the end."""
    rng = random.Random(i)
    kind, model, prompt = rng.choice(KINDS), rng.choice(["tiny", "tiny-qwen2"]), rng.choice(PROMPTS)
    tokens = 8
    if kind == "models":
        assert client.get(f"{base_url}/models").status_code == 200
        return kind
    if kind == "bad":
        response = client.post(f"{base_url}/completions", json={"model": model, "prompt": prompt, "max_tokens": "8"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
        return kind
    is_chat = kind.startswith("chat")
    path = "/chat/completions" if is_chat else "/completions"
    body = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": "stream" in kind}
    body.update({"messages": [{"role": "user", "content": prompt}]} if is_chat else {"prompt": prompt})
    if kind == "leave-stream":  # read the first chunk, then hang up
        with client.stream("POST", base_url + path, json={**body, "max_tokens": 64, "stream": True}) as stream:
            assert stream.status_code == 200
            next(line for line in stream.iter_lines() if line.startswith("data:"))
        return "left"
    if kind == "leave-waiting":  # give up waiting for a whole answer (the model may be busy with others)
        try:
            response = httpx.post(base_url + path, json={**body, "max_tokens": 64},
                                  timeout=httpx.Timeout(30, read=rng.uniform(0.005, 0.05)))
        except httpx.ReadTimeout:
            return "left"
        assert response.status_code == 200
        return kind
    response = client.post(base_url + path, json=body)
    assert response.status_code == 200, response.text
    if body["stream"]:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
        text = "".join((c["choices"][0].get("delta", {}).get("content") or "") if is_chat
                       else c["choices"][0]["text"] for c in chunks if c["choices"])
    else:
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if is_chat else choice["text"]
    assert text == expected[model, prompt, is_chat], (i, kind, model, prompt)  # its own tokens, no one else's
    return kind


def live(kind) -> int:
    gc.collect()  # a finished generation and its task refer to each other
    return sum(1 for o in gc.get_objects() if type(o) is kind)  # type(): isinstance() asks deprecated objects for __class__


def resident() -> int:
    gc.collect()
    malloc_trim()
    return rss_bytes()


def test_a_soak_of_mixed_requests_some_abandoned():
    llms = {"tiny": TextGenerationPipeline(tiny_llm("llama"), byte_tokenizer()),
            "tiny-qwen2": TextGenerationPipeline(tiny_llm("qwen2"), byte_tokenizer())}
    # each prompt's own greedy answer, from the lane directly; told apart from one another
    expected = {}
    for name, llm in llms.items():
        for prompt in PROMPTS:
            expected[name, prompt, False] = llm(prompt, max_new_tokens=8).text
            expected[name, prompt, True] = llm(prompt, chat=True, max_new_tokens=8).text
    assert len(set(expected.values())) == len(expected)

    held = {kind: live(kind) for kind in (_Generation, DynamicCache)}  # what other tests may still hold
    with serving(create_api(llms)) as base_url:
        clients = [httpx.Client(timeout=TIMEOUT) for _ in range(SOAK_CLIENTS)]

        def run(requests: range) -> list[str]:
            with ThreadPoolExecutor(SOAK_CLIENTS) as pool:
                return list(pool.map(lambda i: soak_request(clients[i % SOAK_CLIENTS], base_url, i, expected),
                                     requests))

        warm_up = SOAK_REQUESTS // 5
        run(range(warm_up))  # the allocator, the thread pool and the connections settle
        start = resident()
        kinds = run(range(warm_up, SOAK_REQUESTS))
        for client in clients:
            client.close()
        # the last of the abandoned generations end after their current step
        deadline = time.monotonic() + 30
        while live(_Generation) > held[_Generation] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {kind: live(kind) for kind in held} == held  # nothing a request held outlives it
        assert resident() <= start * 1.05, (start, resident())
        # every kind was tried, clients left mid-way, and the server still answers each model
        assert set(kinds) >= set(KINDS) - {"leave-stream", "leave-waiting"} and kinds.count("left") >= 10
        for name in llms:
            out = httpx.post(f"{base_url}/completions", json={"model": name, "prompt": PROMPTS[0], "max_tokens": 8,
                                                               "temperature": 0}, timeout=TIMEOUT).json()
            assert out["choices"][0]["text"] == expected[name, PROMPTS[0], False]
