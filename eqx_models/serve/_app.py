"""The ASGI application: OpenAI's endpoints on Starlette, over a `SlotEngine` run by one
background thread that owns the device.

Handlers run on the event loop; they never touch JAX. They turn a body into engine requests
(`SlotEngine.submit`, thread-safe), and the engine's callbacks (in its thread) hand tokens
back through `loop.call_soon_threadsafe` into one asyncio queue per HTTP request. Text is
made in the engine's thread (`_Text`: incremental detokenisation and stop sequences), so a
stop sequence frees the slot at once. A streaming client that goes away cancels its engine
requests (Starlette cancels the response), which frees their slots at the next step.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import BusyError, EqxModelsError
from ..generation import SlotEngine, SlotRequest, Token
from ..models import Seq2SeqLM
from ..text import Codec, StreamDecoder, Tokenizer, prompt_ids
from ._protocol import Chat, Completion, RequestError, Sampling, error_body, model_name, parse_chat, parse_completion

log = logging.getLogger("eqx_models.serve")


class _Text:
    """A choice's text as tokens arrive: decoded incrementally, cut at the first stop
    sequence, and held back while its tail could still begin one."""

    def __init__(self, codec: Codec, prefix: list[int], stops: tuple[str, ...]):
        self.decoder = StreamDecoder(codec, prefix=prefix)
        self.stops = stops
        self.pending = ""  # decoded, not yet released (it may start a stop sequence)
        self.released = 0  # characters released so far
        self.stopped = False

    def push(self, token: int) -> str:
        return self._release(self.decoder.push([token]), final=False)

    def finish(self) -> str:
        return "" if self.stopped else self._release(self.decoder.flush(), final=True)

    def _release(self, piece: str, *, final: bool) -> str:
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
        elif final:
            out, self.pending = self.pending, ""
        else:  # keep the longest tail that is a prefix of a stop sequence
            keep = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
            out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        self.released += len(out)
        return out


class _Choice:
    """One engine request and what it produced, fed from the engine's thread."""

    def __init__(self, served: "Served", index: int, prompt: list[int], sampling: Sampling, seed: int, events):
        self.index, self.prompt_tokens, self.events = index, len(prompt), events
        self.loop = asyncio.get_running_loop()
        self.text = _Text(served.codec, [] if served.seq2seq else prompt, sampling.stop)
        self.codec, self.logprobs = served.codec, sampling.logprobs
        self.completion_tokens = 0
        self.request = SlotRequest(
            prompt,
            sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
            top_logprobs=bool(sampling.logprobs),
            on_token=self._on_token,
            on_done=self._on_done,
        )

    def _send(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is gone
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def _on_token(self, token: Token) -> bool:
        self.completion_tokens += 1
        offset = self.text.released + len(self.text.pending)
        piece = self.text.push(token.id)
        info = None
        if self.logprobs is not None:
            top = [(self.codec.decode([i], skip_special_tokens=False), lp) for i, lp in token.top[: self.logprobs]]
            info = (self.codec.decode([token.id], skip_special_tokens=False), token.logprob, top, offset)
        self._send(("token", self.index, piece, info))
        return self.text.stopped

    def _on_done(self, reason: str) -> None:
        self._send(("done", self.index, self.text.finish(), reason))


class Served:
    """The model being served: its engine, tokenizer and name, and the engine's thread."""

    def __init__(self, engine: SlotEngine, codec: Codec, name: str):
        self.engine, self.codec, self.name = engine, codec, name
        self.seq2seq = isinstance(engine.model, Seq2SeqLM)
        self.created = int(time.time())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def has_chat(self) -> bool:
        return isinstance(self.codec, Tokenizer) and self.codec.chat_template is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.engine.run, args=(self._stop,), name="eqx-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def encode(self, prompt: str | tuple[int, ...]) -> list[int]:
        if isinstance(prompt, tuple):
            return list(prompt)
        try:
            return prompt_ids(self.codec, prompt, vocab_size=self.engine.model.config.vocab_size)
        except EqxModelsError as err:
            raise RequestError(str(err), param="prompt") from None


def _error(err: RequestError, endpoint: str) -> JSONResponse:
    log.info("rejected %s request: %d %s", endpoint, err.status, err.message)
    return JSONResponse(err.body(), status_code=err.status)


async def _body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError("We could not parse the JSON body of your request: it is not valid JSON") from None


class _Run:
    """One HTTP request's engine requests, from submission to the last event."""

    def __init__(self, served: Served, kind: str, prompts: list[list[int]], sampling: Sampling):
        self.served, self.kind, self.sampling = served, kind, sampling
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.events: asyncio.Queue = asyncio.Queue()
        base = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        self.choices = [
            _Choice(served, p * sampling.n + j, prompt, sampling, (base + j) % 2**63, self.events)
            for p, prompt in enumerate(prompts)
            for j in range(sampling.n)
        ]
        self.texts = [""] * len(self.choices)
        self.reasons: list[str | None] = [None] * len(self.choices)
        self.logprobs: list[list[tuple]] = [[] for _ in self.choices]

    def submit(self) -> None:
        try:
            self.served.engine.submit(*(c.request for c in self.choices))
        except BusyError as err:
            raise RequestError(str(err), status=429, kind="rate_limit_error") from None
        except EqxModelsError as err:
            raise RequestError(str(err)) from None

    def cancel(self) -> None:
        for choice, reason in zip(self.choices, self.reasons, strict=True):
            if reason is None:
                self.served.engine.cancel(choice.request)

    async def events_until_done(self) -> AsyncIterator[tuple]:
        while any(r is None for r in self.reasons):
            event = await self.events.get()
            kind, index, piece, extra = event
            self.texts[index] += piece
            if kind == "token" and extra is not None:
                self.logprobs[index].append(extra)
            if kind == "done":
                self.reasons[index] = extra
            yield event

    @property
    def usage(self) -> dict[str, int]:
        prompt = sum(c.prompt_tokens for c in self.choices[:: self.sampling.n])
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def log(self, status: str) -> None:
        usage = self.usage
        log.info(
            "%s %s: %d tokens in, %d out, %s, %.3fs",
            self.id,
            self.kind,
            usage["prompt_tokens"],
            usage["completion_tokens"],
            status,
            time.perf_counter() - self.started,
        )

    def failed(self) -> RequestError | None:
        if "error" in self.reasons:
            return RequestError("decoding failed on the server; see its log", status=500)
        return None


def _completion_logprobs(entries: list[tuple]) -> dict[str, Any]:
    return {
        "tokens": [e[0] for e in entries],
        "token_logprobs": [e[1] for e in entries],
        "top_logprobs": [dict(e[2]) for e in entries],
        "text_offset": [e[3] for e in entries],
    }


def _chat_logprobs(entries: list[tuple]) -> dict[str, Any]:
    entry = lambda token, lp: {"token": token, "logprob": lp, "bytes": list(token.encode())}  # noqa: E731
    return {"content": [{**entry(e[0], e[1]), "top_logprobs": [entry(t, lp) for t, lp in e[2]]} for e in entries]}


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def _final(run: _Run) -> dict[str, Any]:
    chat = run.kind == "chat"
    choices = []
    for index, (text, reason) in enumerate(zip(run.texts, run.reasons, strict=True)):
        logprobs = None
        if run.sampling.logprobs is not None:
            logprobs = (_chat_logprobs if chat else _completion_logprobs)(run.logprobs[index])
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": _finish_reason(reason)}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        choices.append(choice)
    return {
        "id": run.id,
        "object": "chat.completion" if chat else "text_completion",
        "created": run.created,
        "model": run.served.name,
        "choices": choices,
        "usage": run.usage,
    }


def _chunk(run: _Run, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
    body = {
        "id": run.id,
        "object": "chat.completion.chunk" if run.kind == "chat" else "text_completion",
        "created": run.created,
        "model": run.served.name,
        "choices": choices,
    }
    if run.sampling.include_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _stream(run: _Run) -> AsyncIterator[str]:
    chat = run.kind == "chat"
    finished = False
    try:
        if chat:  # OpenAI's first chunk of each choice names the role
            yield _chunk(run, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None} for i in range(len(run.choices))])  # fmt: skip
        async for kind, index, piece, extra in run.events_until_done():
            logprobs = None
            if kind == "token" and extra is not None:
                logprobs = (_chat_logprobs if chat else _completion_logprobs)([extra])
            if kind == "token" and not piece and logprobs is None:
                continue
            if kind == "done" and extra == "error":  # OpenAI's way to fail a stream that has begun
                yield f"data: {json.dumps(error_body('decoding failed on the server', kind='server_error'))}\n\n"
            reason = _finish_reason(extra) if kind == "done" else None
            if chat:
                delta = {"content": piece} if piece or kind == "token" else {}
                choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            else:
                choice = {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": reason}
            yield _chunk(run, [choice])
        if run.sampling.include_usage:
            yield _chunk(run, [], run.usage)
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:  # the client went away (or the server is stopping): free the slots
            run.cancel()
        run.log("ok" if finished else "disconnected")


async def _respond(served: Served, kind: str, prompts: list[list[int]], sampling: Sampling) -> Response:
    run = _Run(served, kind, prompts, sampling)
    run.submit()
    if sampling.stream:
        return StreamingResponse(_stream(run), media_type="text/event-stream")
    try:
        async for _ in run.events_until_done():
            pass
    finally:
        run.cancel()  # a no-op when every choice ended; frees the slots if the handler was cancelled
    failure = run.failed()
    run.log("ok" if failure is None else "error")
    if failure is not None:
        return JSONResponse(failure.body(), status_code=failure.status)
    return JSONResponse(_final(run))


def build_app(served: Served) -> Starlette:
    """The Starlette app of `served`: `/health`, `/v1/models`, `/v1/completions`,
    `/v1/chat/completions`. Its lifespan starts and stops the engine's thread."""

    async def health(request: Request) -> Response:
        engine = served.engine
        return JSONResponse(
            {
                "status": "ok",
                "model": served.name,
                "slots": engine.slots,
                "active": engine.active,
                "waiting": engine.waiting,
            }  # fmt: skip
        )

    async def models(request: Request) -> Response:
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "eqx_models"}
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request: Request) -> Response:
        try:
            body = await _body(request)
            parsed: Completion = parse_completion(body, served.engine.max_new_tokens)
            model_name(body, served.name)
            prompts = [served.encode(p) for p in parsed.prompts]
            return await _respond(served, "completion", prompts, parsed.sampling)
        except RequestError as err:
            return _error(err, "completion")

    async def chat(request: Request) -> Response:
        try:
            body = await _body(request)
            parsed: Chat = parse_chat(body, served.engine.max_new_tokens)
            model_name(body, served.name)
            if not served.has_chat:
                raise RequestError(f"{served.name} has no chat template: use /v1/completions", status=404)
            try:
                ids = served.codec.apply_chat_template(list(parsed.messages), add_generation_prompt=True)
            except EqxModelsError as err:
                raise RequestError(str(err), param="messages") from None
            return await _respond(served, "chat", [ids], parsed.sampling)
        except RequestError as err:
            return _error(err, "chat")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = f"{request.method} {request.url.path} is not an endpoint of this server"
        if status == 405:
            message = f"{request.url.path} does not accept {request.method}"
        return JSONResponse(error_body(message, kind="invalid_request_error"), status_code=status)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        served.start()
        try:
            yield
        finally:
            served.stop()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
