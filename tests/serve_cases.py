"""Fixtures of the serving tests (JAX only, no torch): tiny random models (a GPT-Neo and a T5,
every parameter drawn at random so that greedy decoding has no near ties to trip on), model
folders to serve, and the server run in a thread on a free port of 127.0.0.1."""

import http.client
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from shapes import GPT_NEO, T5

import eqx_models
from eqx_models import serve
from eqx_models.models.gpt_neo import GPTNeoConfig, GPTNeoForCausalLM
from eqx_models.models.t5 import T5Config, T5ForConditionalGeneration

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stdlib-gpt-neo"


def random_model(cls: type, config, seed: int = 0, std: float = 1.0) -> eqx.Module:
    """A model of `cls` whose every parameter is drawn from N(0, std²) (vectors, which hold
    norm scales, around 1), built on the abstract skeleton: no initialiser runs, numpy fills
    the leaves, so no XLA op compiles per leaf."""
    rng = np.random.default_rng(seed)
    skeleton = eqx.filter_eval_shape(cls, config, key=jax.random.key(seed))
    abstract = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    draw = lambda x: (len(x.shape) == 1) + std * rng.standard_normal(x.shape)  # noqa: E731
    fill = lambda x: jnp.asarray(draw(x), x.dtype) if abstract(x) else x  # noqa: E731
    model = jax.tree.map(fill, skeleton, is_leaf=abstract)
    return eqx.nn.inference_mode(model)


def tiny_gpt_neo(seed: int = 0) -> GPTNeoForCausalLM:
    config = GPTNeoConfig(
        **{**GPT_NEO, "num_layers": 2, "attention_types": ((("global", "local"), 1),), "pad_token_id": 0},
        eos_token_id=5,
    )
    return random_model(GPTNeoForCausalLM, config, seed)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    return random_model(T5ForConditionalGeneration, T5Config(**T5), seed)


#: A chat template for the bundled model's tokenizer (which ships none), enough to test the endpoint.
CHAT_TEMPLATE = (
    "{% for m in messages %}# {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}# assistant:{% endif %}"
)


def chat_folder(tmp: Path) -> Path:
    """A copy of the bundled model whose tokenizer has `CHAT_TEMPLATE`."""
    folder = tmp / "neo-chat"
    shutil.copytree(EXAMPLE, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return folder


def t5_folder(tmp: Path) -> Path:
    """A tiny random T5 with a byte vocabulary (256 bytes, then pad/start and EOS ids mapped
    onto bytes 0 and 1, which prompts never hold), saved as an eqx folder."""
    model = random_model(T5ForConditionalGeneration, T5Config(**{**T5, "vocab_size": 260}), 1)
    folder = tmp / "t5-bytes"
    eqx_models.save_pretrained(model, folder)
    return folder


class ServerThread:
    """`eqx_models.serve` on 127.0.0.1 at a free port, in a thread of this process."""

    def __init__(self, served):
        self.served = served
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = serve.server(served, grace=5.0)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def request(method: str, url: str, body: bytes | dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """A plain HTTP request (standard library): the status and the JSON body."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def sse_lines(url: str, body: dict, timeout: float = 120) -> Iterator[str]:
    """The `data: ...` payloads of a streaming POST, as they arrive; closing the generator
    hangs up."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        for line in response:
            if line.startswith(b"data: "):
                yield line[6:].decode().strip()
    finally:
        connection.close()
