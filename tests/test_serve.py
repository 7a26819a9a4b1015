"""`eqx-models serve` through the official `openai` client against a server on 127.0.0.1:
completions and chat completions equal in-process greedy `generate` token for token,
streams concatenate to the same text, concurrent clients get what they get alone, bad
requests get OpenAI's 4xx error bodies and the server keeps serving, a dropped stream frees
its slot, and SIGTERM drains in-flight work and exits 0."""

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from serve_cases import EXAMPLE, ServerThread, chat_folder, request, sse_lines, t5_folder

import eqx_models
from eqx_models import serve
from eqx_models.text import StreamDecoder

PROMPTS = ["def parse(", "import os\n", "class Node:\n    def __init__(self", "for i in range(10):\n    total +="]


@pytest.fixture(scope="module")
def neo(tmp_path_factory):
    served = serve.load_served(str(chat_folder(tmp_path_factory.mktemp("serve"))), slots=4, context=128, max_queue=16)
    serve.warm_up(served)
    with ServerThread(served) as server:
        yield server


def generated(served, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
    """The new ids greedy `generate` continues `ids` with (end token dropped), and why it stopped."""
    engine = served.engine
    out = np.asarray(
        eqx_models.generate(engine.model, np.asarray([ids]), max_new_tokens=max_tokens, eos_token_id=sorted(engine.eos))
    )[0, 1 if served.seq2seq else len(ids) :].tolist()
    ended = [i for i, t in enumerate(out) if t in engine.eos]
    return (out[: ended[0]], "stop") if ended else (out, "length")


def expected(served, ids: list[int], max_tokens: int) -> tuple[str, str]:
    """What greedy `generate` continues `ids` with, as text, and its finish reason."""
    new, reason = generated(served, ids, max_tokens)
    decoder = StreamDecoder(served.codec, prefix=[] if served.seq2seq else ids)
    return decoder.push(new) + decoder.flush(), reason


def test_completions_equal_greedy_generate_and_streams_concatenate(neo):
    client, served = neo.client(), neo.served
    response = client.completions.create(model=served.name, prompt=PROMPTS[:2], max_tokens=24, temperature=0)
    for prompt, choice in zip(PROMPTS[:2], response.choices, strict=True):
        text, reason = expected(served, served.encode(prompt), 24)
        assert (choice.text, choice.finish_reason) == (text, reason)
    prompt_tokens = sum(len(served.encode(p)) for p in PROMPTS[:2])
    assert response.usage.prompt_tokens == prompt_tokens and response.usage.completion_tokens > 0
    stream = client.completions.create(
        model=served.name,
        prompt=PROMPTS[0],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == response.choices[0].text
    ids = served.encode(PROMPTS[0])
    assert not chunks[-1].choices and chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == len(generated(served, ids, 24)[0])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == response.choices[0].finish_reason


def test_chat_completions_equal_greedy_generate_on_the_chat_template(neo):
    client, served = neo.client(), neo.served
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    response = client.chat.completions.create(model=served.name, messages=messages, max_tokens=20, temperature=0)
    ids = served.codec.apply_chat_template(messages, add_generation_prompt=True)
    text, reason = expected(served, ids, 20)
    assert response.choices[0].message.content == text and response.choices[0].finish_reason == reason
    assert response.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(
        model=served.name, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    scored = client.chat.completions.create(
        model=served.name, messages=messages, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == text
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob) for e in content)


def test_logprobs_stop_sequences_and_seeded_sampling(neo):
    client, served = neo.client(), neo.served
    greedy = client.completions.create(model=served.name, prompt=PROMPTS[2], max_tokens=16, temperature=0, logprobs=3)
    logprobs = greedy.choices[0].logprobs
    assert "".join(logprobs.tokens) == greedy.choices[0].text  # byte-level BPE: tokens spell the text
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
    assert logprobs.text_offset == list(np.cumsum([0] + [len(t) for t in logprobs.tokens[:-1]]))
    text = greedy.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(model=served.name, prompt=PROMPTS[2], max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [
        client.completions.create(model=served.name, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, seed=7, n=2)
        for _ in range(2)
    ]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # the seed decides


def test_sixteen_concurrent_clients_get_their_answers_alone(neo):
    client, served = neo.client(), neo.served
    jobs = [(PROMPTS[i % 4] + " " * (i // 4), 8 + 3 * (i % 5)) for i in range(16)]

    def ask(job):
        prompt, max_tokens = job
        choice = client.completions.create(model=served.name, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return choice.choices[0].text, choice.choices[0].finish_reason

    alone = [ask(job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    assert len(set(alone)) > 4


BAD = [
    ({"prompt": "x", "max_tokens": "8"}, 400, "max_tokens must be an integer"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature must be between"),
    ({"prompt": "x", "max_tokens": 129}, 400, "max_tokens must be between 1 and 128"),
    ({"prompt": "x " * 200, "max_tokens": 8}, 400, "context"),
    ({"prompt": "x", "frobnicate": 1}, 400, "Unrecognized request argument supplied: frobnicate"),
    ({"prompt": 12}, 400, "prompt must be"),
    ({"prompt": [5000]}, 400, "outside"),
    ({"prompt": "x", "echo": True}, 400, "echo=True is not supported"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"max_tokens": 4}, 400, "prompt is required"),
    ({"prompt": ["x"] * 8, "n": 3, "max_tokens": 4}, 429, "waiting"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=[b[2].split()[0] for b in BAD])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(neo, body, status, message):
    got, answer = request("POST", neo.url + "/v1/completions", body)
    assert got == status
    error = answer["error"]
    assert message in error["message"] and error["type"] in ("invalid_request_error", "rate_limit_error")
    got, answer = request("POST", neo.url + "/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert got == 200 and answer["choices"][0]["finish_reason"] in ("stop", "length")


def test_malformed_bodies_and_unknown_routes(neo):
    assert request("POST", neo.url + "/v1/completions", b"{not json")[0] == 400
    status, answer = request("GET", neo.url + "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "invalid_request_error"
    assert request("GET", neo.url + "/v1/completions")[0] == 405
    with pytest.raises(openai.BadRequestError, match="messages must be"):
        neo.client().chat.completions.create(model=neo.served.name, messages=[])
    models = neo.client().models.list()
    assert [m.id for m in models.data] == [neo.served.name]
    assert request("GET", neo.url + "/health") == (200, {**request("GET", neo.url + "/health")[1], "status": "ok"})


def test_a_client_that_drops_its_stream_frees_the_slot(neo):
    body = {"prompt": PROMPTS[0], "max_tokens": 120, "temperature": 0, "stream": True}
    lines = sse_lines(neo.url + "/v1/completions", body)
    next(lines)
    assert request("GET", neo.url + "/health")[1]["active"] == 1
    lines.close()  # one chunk, then hang up
    deadline = time.monotonic() + 30
    while (health := request("GET", neo.url + "/health")[1])["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0 and health["waiting"] == 0


@pytest.mark.slow
def test_a_seq2seq_model_serves_like_generate(tmp_path):
    served = serve.load_served(str(t5_folder(tmp_path)), slots=3, context=32, max_tokens_limit=16, byte_level=True)
    prompts = ["summarise this", "a b c d e f g h i j k l m", "hello"]
    with ServerThread(served) as server:
        response = server.client().completions.create(model=served.name, prompt=prompts, max_tokens=16, temperature=0)
    for prompt, choice in zip(prompts, response.choices, strict=True):
        assert (choice.text, choice.finish_reason) == expected(served, served.encode(prompt), 16)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "eqx_models", "serve", str(EXAMPLE), "--port", str(port), "--max-batch", "2"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if request("GET", url + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "stream": True}
        pieces = []
        for piece in sse_lines(url + "/v1/completions", body):
            if not pieces:  # in flight: ask the server to stop
                process.send_signal(signal.SIGTERM)
            pieces.append(piece)
        assert pieces[-1] == "[DONE]"
        assert json.loads(pieces[-2])["choices"][0]["finish_reason"] in ("length", "stop")
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log = process.communicate()[1]
    assert "completion: " in log and "tokens in" in log  # one line for the request


def test_a_bounded_load_test_reports_throughput_and_latency(neo):
    prompts = [PROMPTS[i % 4] for i in range(12)]
    report = serve.load_test(neo.url, prompts, clients=4, max_tokens=8, time_limit=120, model=neo.served.name)
    print(report.line())
    assert len(report.latencies) == 12 and report.seconds < 120
    assert 0 < report.percentile(50) <= report.percentile(99) <= report.seconds
    assert report.tokens_per_second > 0 and len(set(report.texts)) == 4  # one answer per distinct prompt
    with pytest.raises(eqx_models.EqxModelsError, match="not answered within"):
        serve.load_test(neo.url, prompts, clients=1, max_tokens=100, time_limit=0.2)


@pytest.mark.slow
def test_int8_weights_and_lora_adapters_are_served(tmp_path):
    import equinox as eqx
    import jax

    from eqx_models.lora import LoRALinear, add_lora, save_adapter
    from eqx_models.nn import QuantizedWeight

    base = eqx_models.from_pretrained(EXAMPLE)
    adapted = add_lora(base, rank=2, alpha=4, target_modules=["q_proj", "v_proj"], key=jax.random.key(0))
    is_lora = lambda x: isinstance(x, LoRALinear)  # noqa: E731
    # PEFT starts B at zero: give the adapters something to change
    shift = lambda x: eqx.tree_at(lambda layer: layer.lora_B, x, x.lora_B + 0.5) if is_lora(x) else x  # noqa: E731
    adapted = jax.tree.map(shift, adapted, is_leaf=is_lora)
    save_adapter(adapted, tmp_path / "adapter")
    served = serve.load_served(str(EXAMPLE), slots=2, context=64, quantize="int8", adapter=str(tmp_path / "adapter"))
    leaves = jax.tree.leaves(served.engine.model, is_leaf=lambda x: is_lora(x) or isinstance(x, QuantizedWeight))
    assert any(is_lora(x) for x in leaves) and any(isinstance(x, QuantizedWeight) for x in leaves)
    with ServerThread(served) as server:
        answer = server.client().completions.create(model=served.name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    text = answer.choices[0].text
    assert (text, answer.choices[0].finish_reason) == expected(served, served.encode(PROMPTS[0]), 12)
    plain = serve.load_served(str(EXAMPLE), slots=1, context=64)
    assert text != expected(plain, plain.encode(PROMPTS[0]), 12)[0]  # the adapters and int8 weights took effect


def test_layers_stored_separately_serve_the_stacked_models_answers():
    """`serve --separate-layers`: the continuous-batching engine over separately stored layers
    gives each of several concurrent requests what greedy `generate` gives with the default,
    stacked layers."""
    from eqx_models import nn

    served = serve.load_served(str(EXAMPLE), slots=3, context=96, separate_layers=True)
    assert nn.has_separate_layers(served.engine.model)
    stacked = serve.load_served(str(EXAMPLE), slots=1, context=96)
    assert not nn.has_separate_layers(stacked.engine.model)
    jobs = [(PROMPTS[i % 4], 6 + 5 * i) for i in range(6)]
    with ServerThread(served) as server:
        client = server.client()

        def ask(job):
            prompt, max_tokens = job
            answer = client.completions.create(model=served.name, prompt=prompt, max_tokens=max_tokens, temperature=0)
            return answer.choices[0].text, answer.choices[0].finish_reason

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
    assert answers == [expected(stacked, stacked.encode(prompt), max_tokens) for prompt, max_tokens in jobs]


@pytest.mark.parametrize("flags", [["--port", "70000"], ["--max-batch", "0"], ["--quantize", "int4"]])
def test_serve_flags_are_checked_before_loading(flags, capsys):
    from eqx_models.cli import EXIT_BAD_INPUT, main

    assert main(["serve", "/nonexistent", *flags]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith("error: ") and flags[0] in error and "/nonexistent" not in error
