"""The remote lane (pipelines/remote.py) against servers that do less than asked: one that answers a
whole JSON object instead of a stream (as llama.cpp's server in the cyllama wheel does), one that
sends no log-probabilities, one that serves only chat, and answers that are no completion at all.
Each is a scripted fake on a free local port (http.server in a thread); the lane against a real
server, ours, is in test_server.py."""

import http.server
import json
import logging
import math
import threading

import pytest

from pipelines.remote import NO_LOGPROBS, NO_STREAM, RemoteError, RemoteTextGeneration

SSE = "text/event-stream"
JSON = "application/json"


class FakeServer:
    """Answers each path with what a test scripted: (status, content type, body). Notes the JSON
    bodies it was sent."""

    def __init__(self):
        self.answers: dict[str, tuple[int, str, bytes]] = {}
        self.received: list[tuple[str, dict]] = []

    def answer(self, path: str, body, status: int = 200, content_type: str = JSON):
        if not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        self.answers[path] = (status, content_type, body.encode() if isinstance(body, str) else body)

    def stream(self, path: str, chunks: list[dict]):
        """Server-sent events: each chunk, then [DONE]."""
        self.answer(path, "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n",
                    content_type=SSE)

    def handler(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                fake.received.append((self.path, json.loads(self.rfile.read(length))))
                self.reply()

            def do_GET(self):
                self.reply()

            def reply(self):
                status, content_type, body = fake.answers.get(
                    self.path, (404, JSON, b'{"detail": "Not Found"}'))  # FastAPI's answer to an unknown route
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # quiet: the test output stays clean
                pass

        return Handler


@pytest.fixture
def fake():
    server = FakeServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), server.handler())
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def warnings_of(caplog) -> list[str]:
    """What the remote lane said (it logs a warning for each thing a server leaves out)."""
    return [r.getMessage() for r in caplog.records if r.name == "pipelines.remote"]


# A chat answer as cyllama's llama.cpp server gives it: one JSON object, whatever `stream` asked
WHOLE_CHAT = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "smol",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "A pod is a group."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
}


def test_a_server_that_does_not_stream_is_read_as_a_whole_answer(fake, caplog):
    fake.answer("/v1/chat/completions", WHOLE_CHAT)
    remote = RemoteTextGeneration(fake.url, "smol")
    with caplog.at_level(logging.WARNING, logger="pipelines.remote"):
        events = list(remote.stream("What is a pod?", chat=True, max_new_tokens=8))
        again = remote("What is a pod?", chat=True, max_new_tokens=8)
    assert [(e.phase, e.text, e.finish_reason, e.top) for e in events] == [("prefill", "A pod is a group.", "eos", [])]
    assert again.text == "A pod is a group." and again.finish_reason == "eos"
    assert events[0].ms > 0  # the whole wait, on the one event
    assert fake.received[0][1]["stream"] is True  # it was asked to stream all the same
    # both shortfalls said, each once for this remote model
    assert remote.notes == [NO_STREAM, NO_LOGPROBS]
    assert len(warnings_of(caplog)) == 2
    assert any(NO_LOGPROBS in message and fake.url in message for message in warnings_of(caplog))


def test_a_whole_completion_with_logprobs_gives_one_event_per_token(fake):
    top = [{" pod": -0.1, " Pod": -2.5}, {"s": -0.2, " is": -1.9}]
    fake.answer("/v1/completions", {
        "object": "text_completion",
        "choices": [{"index": 0, "text": " pods", "finish_reason": "length",
                     "logprobs": {"tokens": [" pod", "s"], "token_logprobs": [-0.1, -0.2], "top_logprobs": top,
                                  "text_offset": [0, 4]}}],
    })
    remote = RemoteTextGeneration(fake.url, "smol")
    events = list(remote.stream("Kubernetes", max_new_tokens=2, top_logprobs=2))
    assert [(e.phase, e.index, e.text, e.logprob, e.finish_reason) for e in events] == [
        ("prefill", 0, " pod", -0.1, None), ("decode", 1, "s", -0.2, "length")]
    assert [(t, p) for t, _, p in events[0].top] == [(" pod", pytest.approx(math.exp(-0.1))),
                                                    (" Pod", pytest.approx(math.exp(-2.5)))]
    assert events[0].timing is not None and events[1].timing is None  # they arrived together
    assert remote.notes == [NO_STREAM]


def test_a_stream_without_logprobs_gives_the_text_and_says_so_once(fake, caplog):
    chunks = [{"choices": [{"index": 0, "text": piece, "finish_reason": None}]} for piece in ("The", " cat")]
    fake.stream("/v1/completions", chunks + [{"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}])
    remote = RemoteTextGeneration(fake.url, "smol")
    with caplog.at_level(logging.WARNING, logger="pipelines.remote"):
        events = list(remote.stream("Once", max_new_tokens=2, top_logprobs=5))
        list(remote.stream("Once", max_new_tokens=2, top_logprobs=5))
    assert [(e.text, e.logprob, e.top, e.finish_reason) for e in events] == [
        ("The", None, [], None), (" cat", None, [], "length")]
    assert remote.notes == [NO_LOGPROBS]
    assert warnings_of(caplog) == [f"the remote LLM at {fake.url}: {NO_LOGPROBS}"]


def test_a_404_on_completions_suggests_chat(fake):
    fake.answer("/v1/chat/completions", WHOLE_CHAT)  # a server that serves only chat
    remote = RemoteTextGeneration(fake.url, "smol")
    with pytest.raises(ValueError, match=r"404 on /completions.*try chat=True"):
        list(remote.stream("Hi"))
    assert remote("Hi", chat=True).text == "A pod is a group."


def test_a_404_for_an_unknown_model_does_not_suggest_chat(fake):
    fake.answer("/v1/completions", {"error": {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                                              "param": "model", "code": "model_not_found"}}, status=404)
    with pytest.raises(ValueError, match="does not exist") as error:
        list(RemoteTextGeneration(fake.url, "nope").stream("Hi"))
    assert "chat=True" not in str(error.value)


def test_a_stream_labelled_as_something_else_is_still_read(fake):
    chunk = {"choices": [{"index": 0, "text": "ok", "finish_reason": "length"}]}
    fake.answer("/v1/completions", f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n", content_type="text/plain")
    assert RemoteTextGeneration(fake.url, "smol")("Hi", max_new_tokens=1).text == "ok"


@pytest.mark.parametrize(
    "body, content_type, says",
    [
        ("<html>Welcome to nginx</html>", "text/html", "does not stream, and its answer is not an OpenAI completion"),
        ('{"result": "no choices here"}', JSON, "not an OpenAI completion"),
        ("", SSE, "empty stream"),
        ("data: [DONE]\n\n", SSE, "empty stream"),
        ("data: {not json\n\n", SSE, "not JSON"),
        ("data: [1, 2]\n\n", SSE, "not a JSON object"),
        ('data: {"error": {"message": "out of memory"}}\n\n', SSE, "failed mid-stream: out of memory"),
    ],
    ids=["html", "json-without-choices", "empty", "only-done", "chunk-not-json", "chunk-not-an-object", "error-chunk"],
)
def test_an_answer_that_is_no_completion_is_an_error_not_silence(fake, body, content_type, says):
    fake.answer("/v1/completions", body, content_type=content_type)
    with pytest.raises(RemoteError, match=says):
        list(RemoteTextGeneration(fake.url, "smol").stream("Hi"))


@pytest.mark.parametrize("kwargs", [dict(prompt="abc \ud800"), dict(prompt="abc", stop=["\udfff"])],
                         ids=["prompt", "stop"])
def test_a_lone_surrogate_is_refused_before_anything_is_sent(fake, kwargs):
    with pytest.raises(ValueError, match="lone surrogate"):
        list(RemoteTextGeneration(fake.url, "smol").stream(**kwargs))
    assert fake.received == []
