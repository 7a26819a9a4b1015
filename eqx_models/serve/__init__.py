"""`eqx-models serve`: an OpenAI-compatible HTTP server with continuous batching.

Starlette (routing, requests, streaming responses) on uvicorn: both small, maintained and the
ASGI stack most Python model servers run on; FastAPI would add pydantic models we do not need,
since every field is checked by hand with OpenAI's messages (`_protocol`).
"""

import logging
import signal

from .. import nn
from ..generation import SlotEngine, SlotRequest
from ..models import CausalLM, Seq2SeqLM
from ..text import Codec
from ._app import Served, build_app
from ._load import LoadReport, load_test
from ._protocol import RequestError, error_body

__all__ = [
    "LoadReport",
    "RequestError",
    "Served",
    "build_app",
    "error_body",
    "load_served",
    "load_test",
    "run",
    "server",
    "warm_up",
]


def load_served(
    src: str,
    *,
    revision: str | None = None,
    slots: int = 8,
    context: int | None = None,
    max_tokens_limit: int | None = None,
    max_queue: int | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    dtype: str | None = None,
    byte_level: bool = False,
    name: str | None = None,
    separate_layers: bool = False,
) -> Served:
    """A folder or hub id, loaded for serving: the model (int8 weights with `quantize`, LoRA
    adapters from `adapter`, each layer's weights in buffers of their own with
    `separate_layers`: `eqx_models.separate_layers`), its tokenizer, and a `SlotEngine` of
    `slots` slots that stops at every end token `generate` would (the config's and
    `generation_config.json`'s)."""
    from ..errors import InputError
    from ..hub import folder
    from ..lora import load_adapter
    from ..pretrained import end_token_ids, from_pretrained
    from ..text import load_tokenizer

    where = folder(src, revision=revision)
    codec: Codec = load_tokenizer(where, byte_level=byte_level)
    model = from_pretrained(where, dtype=dtype, quantize=quantize)
    if not isinstance(model, CausalLM | Seq2SeqLM):
        raise InputError(f"{src} holds a {type(model).__name__}, which does not generate: serve a causal or seq2seq LM")
    if adapter is not None:
        model = load_adapter(model, adapter)
    if separate_layers:  # after the adapters: `add_lora` takes stacked layers
        model = nn.separate_layers(model)
    engine = SlotEngine(
        model,
        slots=slots,
        context=context,
        max_new_tokens=max_tokens_limit,
        max_queue=4 * slots if max_queue is None else max_queue,
        eos_token_id=sorted(end_token_ids(model.config.eos_token_id, where)),
    )
    return Served(engine, codec, name or src)


def warm_up(served: Served) -> None:
    """Compiles the engine's step and its shortest prefill before the first client arrives."""
    engine = served.engine
    engine.submit(SlotRequest([0], min(2, engine.max_new_tokens)))
    while engine.run_once():
        pass


def server(served: Served, *, host: str = "127.0.0.1", port: int = 8000, grace: float | int = 30.0):
    """A `uvicorn.Server` of `served`'s app: `server.run()` serves (`sockets=[...]` for sockets
    bound already), `server.should_exit = True` stops it from another thread."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("eqx_models.serve").setLevel(logging.INFO)
    config = uvicorn.Config(
        build_app(served),
        host=host,
        port=port,
        access_log=False,  # our own line per request has its token counts and time
        timeout_graceful_shutdown=max(1, round(grace)),
        log_level="info",
    )
    return uvicorn.Server(config)


def run(served: Served, *, host: str = "127.0.0.1", port: int = 8000, grace: float | int = 30.0) -> None:
    """Serves until SIGTERM or Ctrl-C. On SIGTERM the server stops accepting connections,
    finishes the requests in flight for up to `grace` seconds, and returns normally."""
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler it found: a drained
    # server has done what SIGTERM asks, so that handler does nothing and we return (exit 0).
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server(served, host=host, port=port, grace=grace).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
