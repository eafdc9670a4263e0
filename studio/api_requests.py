"""The OpenAI-compatible API's requests: the JSON read strictly, every refusal a 400 that names
the field and says what it takes (see studio/server.py for what is refused, and why).

    body = parse_request(CompletionRequest, raw_bytes)    # or raises APIError(400, ...)

Depends on pydantic and studio.values; never on the server's app, a pipeline or Gradio.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from studio.values import lone_surrogate

MAX_LOGPROBS = 20  # OpenAI's limit for chat, vLLM's default max_logprobs
# OpenAI parameters the lane cannot honour: accepted only at their neutral value.
NEUTRAL_VALUES = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logit_bias": None,
                  "presence_penalty": 0.0, "frequency_penalty": 0.0}


StopString = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    # An unknown field is a parameter we would ignore: refuse it. Strict types: "8", true or 2.0 is
    # not a token count, "yes" not a boolean. Infinite numbers (1e999) are no setting either.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default: sampling, not greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: StopString | list[StopString] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # how many alternatives per token
    echo: bool = False
    best_of: int = 1
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # chat templates know "system"; "developer" is OpenAI's newer name for it
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class APIError(Exception):
    """An error the client gets as OpenAI's error object, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


MAX_JSON_DEPTH = 32  # no request nests deeper than 6 levels; far deeper is an attack or a mistake
TOO_DEEP = f"the request body nests deeper than {MAX_JSON_DEPTH} levels"

# A field that takes one of several types: pydantic reports each alternative's failure, so the
# answer says what the field takes instead.
UNION_FIELDS = {
    "prompt": "a string or a non-empty list of strings (token-id prompts are not supported)",
    "stop": "a non-empty string or a list of non-empty strings",
    "content": 'a string or a list of text parts ({"type": "text", "text": ...}); only text is supported',
}


class _InvalidJSON(ValueError):
    pass


def _refuse_constant(name: str):
    raise _InvalidJSON(f"{name} is not a JSON number")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # Python's guard against slow conversions: over 4,300 digits
        raise _InvalidJSON(f"a number has {len(text.lstrip('-'))} digits, too many to read") from None


def load_json(raw: bytes) -> object:
    """The request body as JSON, or a 400 that says why not. Python's reader takes more than JSON
    allows: NaN and Infinity are refused here, and so are integers too long to convert and nesting
    deeper than MAX_JSON_DEPTH (either would otherwise fail deep inside the server as a 500)."""
    try:
        data = json.loads(raw, parse_constant=_refuse_constant, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError, _InvalidJSON) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:  # Python's reader gives up near 1,000 levels
        raise APIError(400, TOO_DEEP, code="invalid_json") from None
    _check_values(data)
    return data


def _check_values(data) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH, and strings that are not Unicode text: JSON's
    escape "\\ud800" reads as a lone surrogate, half of a character, which no tokenizer can take
    and no answer can be encoded with. A loop, not recursion: the depth is the attacker's to choose."""
    stack = [(data, [])]
    while stack:
        value, where = stack.pop()
        if len(where) > MAX_JSON_DEPTH:
            raise APIError(400, TOO_DEEP, code="invalid_json")
        if isinstance(value, str):
            _check_string(value, where)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, where, key=True)
                stack.append((item, [*where, key]))
        elif isinstance(value, list):
            stack.extend((item, [*where, i]) for i, item in enumerate(value))


def _check_string(text: str, where: list, key: bool = False) -> None:
    bad = lone_surrogate(text)
    if bad is not None:
        what = "a field name" if key else "the text"
        at = f"{_path(where)}: " if where else ""
        raise APIError(
            400, f"{at}{what} holds a lone surrogate (U+{ord(text[bad]):04X} at character {bad}), "
            "half of a character, which is not valid Unicode; send characters beyond U+FFFF as a surrogate pair "
            "or as UTF-8", param=str(where[0]) if where else None, code="invalid_unicode",
        )


def _path(loc) -> str:
    """A place in the request as a client writes it: messages[0].content."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def parse_request(model: type[BaseModel], raw: bytes) -> BaseModel:
    """The JSON body as `model`, whatever the Content-Type says (curl -d sends a form type)."""
    data = load_json(raw)
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None
    for param, neutral in NEUTRAL_VALUES.items():
        value = getattr(request, param, neutral)
        if value != neutral and value != {}:
            raise APIError(400, f"unsupported parameter: {param}={value!r}; this server supports only {neutral!r}",
                           param=param, code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return request


def _validation_error(error: ValidationError) -> APIError:
    """pydantic's first complaint as OpenAI's error: param is the request's field, as OpenAI names
    it; the message says where inside it (messages[0].role)."""
    first = error.errors()[0]
    loc = list(first["loc"])
    param = str(loc[0]) if loc else None
    # pydantic names the alternative of a union it tried (prompt.str, prompt.list[str]): cut there
    union = next((i for i, part in enumerate(loc)
                  if isinstance(part, str) and (part == "str" or not part.isidentifier())), None)
    if union is not None:
        field = loc[union - 1]
        return APIError(400, f"{_path(loc[:union])}: expected {UNION_FIELDS.get(field, 'another type')}", param=param)
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unsupported parameter: {_path(loc)!r} is not supported by this server",
                        param=_path(loc), code="unsupported_parameter")
    if not loc:  # the body itself: a list, a number...
        return APIError(400, "the request body must be a JSON object")
    return APIError(400, f"{_path(loc)}: {first['msg']}", param=param)
