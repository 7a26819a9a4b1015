"""OpenAI's request and error formats: parsing `/v1/completions` and `/v1/chat/completions`
bodies into checked requests, and the error body every 4xx carries.

Only what the server implements is accepted. A field OpenAI defines but we do not compute
(`suffix`, `echo`, `best_of`, `logit_bias`, non-zero penalties) is refused by name rather
than ignored, and a field OpenAI does not define is refused as OpenAI refuses it
("Unrecognized request argument supplied")."""

import dataclasses
from typing import Any

#: OpenAI's largest `logprobs` (completions) and `top_logprobs` (chat).
MAX_LOGPROBS = 5
#: At most this many stop sequences, as OpenAI.
MAX_STOPS = 4
#: At most this many choices per prompt.
MAX_N = 16


class RequestError(Exception):
    """A request the server refuses: `status` (4xx), a message naming the problem, and the
    offending field (`param`), returned in OpenAI's error body."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, kind: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, kind=self.kind, param=self.param)


def error_body(message: str, *, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What a request asks of the decoder, shared by both endpoints."""

    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None  # how many alternatives per token; None: no log-probabilities


@dataclasses.dataclass(frozen=True)
class Completion:
    """A checked `/v1/completions` request: its prompts as text or token ids."""

    prompts: tuple[str | tuple[int, ...], ...]
    sampling: Sampling


@dataclasses.dataclass(frozen=True)
class Chat:
    """A checked `/v1/chat/completions` request."""

    messages: tuple[dict[str, str], ...]
    sampling: Sampling


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


class _Fields:
    """Reads a JSON object's fields, each checked against its type and range."""

    def __init__(self, body: Any, allowed: set[str]):
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {_type_name(body)}")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise RequestError(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
        self.body = body

    def _wrong(self, name: str, value: Any, expected: str) -> RequestError:
        return RequestError(f"{name} must be {expected}, got {_type_name(value)} {value!r:.60}", param=name)

    def integer(self, name: str, default: Any, low: int, high: int | None = None) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._wrong(name, value, "an integer")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise RequestError(f"{name} must be {bound}, got {value}", param=name)
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._wrong(name, value, "a number")
        if not low <= value <= high:
            raise RequestError(f"{name} must be between {low} and {high}, got {value}", param=name)
        return float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._wrong(name, value, "a boolean")
        return value

    def unsupported(self, name: str, default: Any) -> None:
        """An OpenAI field this server does not compute: only its default is accepted."""
        value = self.body.get(name)
        if value is not None and value != default:
            raise RequestError(f"{name}={value!r:.60} is not supported by this server", param=name)

    def stops(self) -> tuple[str, ...]:
        value = self.body.get("stop")
        if value is None:
            return ()
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
            raise self._wrong("stop", value, "a non-empty string or an array of them")
        if len(values) > MAX_STOPS:
            raise RequestError(f"stop holds {len(values)} sequences; at most {MAX_STOPS} are allowed", param="stop")
        return tuple(values)

    def stream_options(self, stream: bool) -> bool:
        value = self.body.get("stream_options")
        if value is None:
            return False
        if not stream:
            raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(value, dict) or set(value) - {"include_usage"}:
            raise self._wrong("stream_options", value, 'an object {"include_usage": boolean}')
        usage = value.get("include_usage", False)
        if not isinstance(usage, bool):
            raise self._wrong("stream_options.include_usage", usage, "a boolean")
        return usage


_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user"}
_COMMON |= {"presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
_COMPLETION = _COMMON | {"prompt", "suffix", "echo", "best_of"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}


def _sampling(fields: _Fields, max_tokens: int | None, default_max_tokens: int, logprobs: int | None) -> Sampling:
    for name in ("presence_penalty", "frequency_penalty"):
        fields.unsupported(name, 0)
    fields.unsupported("logit_bias", {})
    if fields.body.get("user") is not None and not isinstance(fields.body["user"], str):
        raise fields._wrong("user", fields.body["user"], "a string")
    stream = fields.boolean("stream")
    return Sampling(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        temperature=fields.number("temperature", 1.0, 0.0, 2.0),
        top_p=fields.number("top_p", 1.0, 0.0, 1.0),
        n=fields.integer("n", 1, 1, MAX_N),
        stop=fields.stops(),
        seed=fields.integer("seed", None, -(2**63), 2**63 - 1),
        stream=stream,
        include_usage=fields.stream_options(stream),
        logprobs=logprobs,
    )


def model_name(body: dict[str, Any], served: str) -> None:
    """Refuses a request for another model than the one served (404, as OpenAI)."""
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise RequestError(f"model must be a string, got {_type_name(name)}", param="model")
    if name != served:
        raise RequestError(
            f"The model `{name}` does not exist; this server serves `{served}`",
            param="model",
            status=404,
            kind="invalid_request_error",
        )


def parse_completion(body: Any, default_max_tokens: int) -> Completion:
    """A `/v1/completions` body, checked field by field."""
    fields = _Fields(body, _COMPLETION)
    fields.unsupported("suffix", None)
    fields.unsupported("echo", False)
    fields.unsupported("best_of", 1)
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        prompts: tuple = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = (tuple(prompt),)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p) for p in prompt
        )
    ):
        prompts = tuple(tuple(p) for p in prompt)
    else:
        raise fields._wrong(
            "prompt", prompt, "a string, an array of strings, an array of token ids or an array of such arrays"
        )
    logprobs = fields.integer("logprobs", None, 0, MAX_LOGPROBS)
    max_tokens = fields.integer("max_tokens", None, 1)
    return Completion(prompts, _sampling(fields, max_tokens, 16, logprobs))  # OpenAI's default: 16 tokens


def _message(value: Any, index: int) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(value, dict) or not isinstance(value.get("role"), str):
        raise RequestError(f"{where} must be an object with a role and content", param=where)
    unknown = sorted(set(value) - {"role", "content", "name"})
    if unknown:
        raise RequestError(f"Unrecognized argument supplied in {where}: {unknown[0]}", param=f"{where}.{unknown[0]}")
    if value["role"] not in ("system", "developer", "user", "assistant"):
        raise RequestError(
            f"{where}.role must be system, developer, user or assistant, got {value['role']!r:.40}", param=where
        )
    content = value.get("content")
    if isinstance(content, list):  # text parts: [{"type": "text", "text": "..."}]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(f"{where}.content parts must all be text parts", param=f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(f"{where}.content must be a string or an array of text parts", param=f"{where}.content")
    return {"role": "system" if value["role"] == "developer" else value["role"], "content": content}


def parse_chat(body: Any, default_max_tokens: int) -> Chat:
    """A `/v1/chat/completions` body, checked field by field."""
    fields = _Fields(body, _CHAT)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty array of messages", param="messages")
    parsed = tuple(_message(m, i) for i, m in enumerate(messages))
    wants = fields.boolean("logprobs")
    top = fields.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not wants:
        raise RequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    max_tokens = fields.integer("max_completion_tokens", None, 1)
    max_tokens = fields.integer("max_tokens", max_tokens, 1)
    return Chat(parsed, _sampling(fields, max_tokens, default_max_tokens, (top or 0) if wants else None))
