"""The OpenAI-compatible server on a loopback port: concurrent streaming and plain requests equal
offline decoding, bad requests get 4xx, a dropped stream is cancelled, /metrics reports it all."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax.numpy as jnp
import pytest
import uvicorn

from specjax.drafters.base import HostDrafter
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.plain import generate_plain, greedy_generate
from specjax.engine.scheduler import Request, Scheduler
from specjax.engine.server import ServingLoop, build_parser, create_app
from specjax.models.chat import encode_chat
from specjax.models.embedded import default_model_dir
from specjax.models.loading import load_model

NAME = "tiny-sql"
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def model():
    # float32: the paged and the contiguous attention sum in other orders, so bfloat16 could flip a near tie.
    return dataclasses.replace(load_model(default_model_dir(), dtype=jnp.float32), chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def server(model):
    """(base url, serving loop) of a server on a free loopback port."""
    scheduler = Scheduler(model, max_slots=4, num_pages=96, page_size=8, max_pages_per_seq=16, max_tree=4,
                          prefill_budget=32, drafter=PromptLookupDrafter(), max_queue=16)
    loop = ServingLoop(scheduler, timeout_s=60)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(model, loop, NAME), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", loop
    uv.should_exit = True
    thread.join()
    loop.close()


def post(url: str, body, raw: bool = False):
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def sse_chunks(text: str) -> list:
    lines = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_serve_concurrent_requests_equal_offline_decoding(model, server):
    base, loop = server
    tok = model.tokenizer
    texts = ["select name from users where id = 1", "select count(*) from orders", "select * from t"]
    prompts = [tok.encode(text).ids for text in texts]
    messages = [{"role": "user", "content": "list the tables"}]
    chat_ids = encode_chat(model, messages)
    greedy = greedy_generate(model, prompts + [chat_ids], 12)
    sampled = generate_plain(model, [prompts[0]], 12, temperature=0.8, seed=[7])[0]

    jobs = [("/v1/completions", dict(prompt=texts[i], stream=i == 1), greedy[i]) for i in range(3)]
    jobs += [("/v1/completions", dict(prompt=prompts[2], stream=True), greedy[2]),
             ("/v1/chat/completions", dict(messages=messages), greedy[3]),
             ("/v1/chat/completions", dict(messages=messages, stream=True), greedy[3]),
             ("/v1/completions", dict(prompt=texts[0], temperature=0.8, seed=7), sampled)]

    def run(job):
        path, fields, expected = job
        body = {"model": NAME, "max_tokens": 12, "temperature": 0.0, **fields}
        status, text = post(base + path, body)
        assert status == 200, text
        if not fields.get("stream"):
            reply = json.loads(text)
            choice = reply["choices"][0]
            content = choice["message"]["content"] if "message" in choice else choice["text"]
            assert choice["token_ids"] == expected and content == tok.decode(expected)
            assert reply["usage"]["completion_tokens"] == len(expected)
            return choice["finish_reason"]
        chunks = sse_chunks(text)
        tokens = [t for chunk in chunks for t in chunk["choices"][0]["token_ids"]]
        key = "delta" if path.endswith("chat/completions") else None
        pieces = [c["choices"][0][key].get("content", "") if key else c["choices"][0]["text"] for c in chunks]
        assert tokens == expected and "".join(pieces) == tok.decode(expected)
        assert [c["choices"][0]["finish_reason"] for c in chunks][-1] in ("stop", "length")
        return chunks[-1]["choices"][0]["finish_reason"]

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        reasons = list(pool.map(run, jobs))
    for (_, _, expected), reason in zip(jobs, reasons):
        assert reason == ("length" if len(expected) == 12 and expected[-1] not in model.config.eos_token_ids
                          else "stop")
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    metrics = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert "# TYPE specjax_finished_total counter" in text and "# TYPE specjax_pages_in_use gauge" in text
    assert int(metrics["specjax_finished_total"]) >= len(jobs) and float(metrics["specjax_tokens_per_pass"]) >= 1
    assert metrics["specjax_queue_length"] == "0" and metrics["specjax_pages_in_use"] == "0"
    assert not loop.scheduler.audit()


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", dict(model="gpt-4", prompt="x"), 404, "model"),
    ("/v1/completions", dict(prompt="x"), 400, "model"),
    ("/v1/completions", dict(model=NAME), 400, "prompt"),
    ("/v1/completions", dict(model=NAME, prompt="x", max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", dict(model=NAME, prompt="x", temperature=-1), 400, "temperature"),
    ("/v1/completions", dict(model=NAME, prompt="x", top_p="high"), 400, "top_p"),
    ("/v1/completions", dict(model=NAME, prompt="x", n=2), 400, "n"),
    ("/v1/completions", dict(model=NAME, prompt="x", logprobs=3), 400, "logprobs"),
    ("/v1/completions", dict(model=NAME, prompt=[1, 2, 100000]), 400, None),
    ("/v1/completions", dict(model=NAME, prompt="select " * 200, max_tokens=8), 400, None),
    ("/v1/chat/completions", dict(model=NAME, messages=[]), 400, "messages"),
    ("/v1/chat/completions", dict(model=NAME, messages="hi"), 400, "messages"),
])
def test_serve_bad_requests_get_4xx(server, path, body, status, param):
    base, loop = server
    code, text = post(base + path, body)
    assert code == status, text
    error = json.loads(text)["error"]
    assert error["message"] and error["param"] == param
    assert loop.scheduler.num_running == 0


def test_serve_rejects_malformed_json_and_binds_loopback_by_default(server):
    base, _ = server
    code, text = post(base + "/v1/completions", b"{not json", raw=True)
    assert code == 400 and "JSON" in json.loads(text)["error"]["message"]
    assert build_parser().parse_args([]).host == "127.0.0.1"


def test_serve_a_dropped_stream_is_cancelled_and_its_pages_freed(server, monkeypatch):
    base, loop = server
    # Steps slowed to 0.2 s: the 100 tokens take seconds, so on a loaded host too the server sees the
    # drop while the request still runs (else it may finish first, and nothing is left to cancel).
    real_step = loop.scheduler.step
    monkeypatch.setattr(loop.scheduler, "step", lambda: (time.sleep(0.2), real_step())[1])
    # Nearly uniform draws (temperature 50) over 1,024 tokens: EOS ends it early only by a rare chance.
    body = dict(model=NAME, prompt="select", max_tokens=100, temperature=50.0, seed=3, stream=True)
    request = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    before = loop.metrics()["cancelled"]
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.readline().startswith(b"data: ")  # the first chunk arrived: the request runs
    deadline = time.monotonic() + 30
    while loop.metrics()["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    metrics = loop.metrics()
    assert metrics["cancelled"] == before + 1 and metrics["requests_running"] == 0 and metrics["pages_in_use"] == 0


def test_serving_loop_times_out_and_frees_pages(model):
    scheduler = Scheduler(model, max_slots=2, num_pages=32, page_size=8, max_pages_per_seq=16, max_tree=0)
    loop = ServingLoop(scheduler, timeout_s=0.0)
    got = []
    done = threading.Event()
    loop.submit(Request([5, 6, 7], 50), lambda event: (got.append(event), done.set()))
    assert done.wait(30)
    loop.close()
    assert isinstance(got[0], TimeoutError) and loop.metrics()["timed_out"] == 1
    assert scheduler.allocator.num_in_use == 0 and not scheduler.has_work()


class _BrokenDrafter(HostDrafter):
    """A host drafter whose proposals raise: the step fails before touching the pages."""

    def propose(self, rid, max_tokens):
        raise RuntimeError("drafter broke")


def test_serving_loop_survives_a_failed_step(model):
    scheduler = Scheduler(model, max_slots=2, num_pages=32, page_size=8, max_pages_per_seq=16, max_tree=2)
    loop = ServingLoop(scheduler)
    got = {"broken": [], "plain": []}
    done = {key: threading.Event() for key in got}

    def listener(key):
        return lambda event: (got[key].append(event),
                              done[key].set() if not hasattr(event, "finished") or event.finished else None)

    loop.submit(Request([5, 6, 7], 8, drafter=_BrokenDrafter()), listener("broken"))
    assert done["broken"].wait(60)
    loop.submit(Request([5, 6, 7], 8), listener("plain"))
    assert done["plain"].wait(60)
    loop.close()
    assert isinstance(got["broken"][-1], RuntimeError) and loop.metrics()["failed_steps"] == 1
    assert [t for event in got["plain"] for t in event.tokens] == greedy_generate(model, [[5, 6, 7]], 8)[0]
    assert scheduler.allocator.num_in_use == 0 and not scheduler.audit()


def test_serve_main_runs_as_a_process_on_loopback(tmp_path):
    """``specjax serve`` (``engine.cli`` hands it to ``engine.server.main``): arguments, loading, uvicorn."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--port", str(port), "--drafter", "prompt-lookup", "--max-slots", "2", "--num-pages", "64",
            "--max-pages-per-seq", "16", "--max-tree", "2", "--prefill-budget", "16"]
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "specjax.engine.cli", "serve", *args], stdout=out,
                                   stderr=out)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                models = json.loads(urllib.request.urlopen(base + "/v1/models", timeout=5).read())
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert models["data"][0]["id"] == "specjax-embedded"
        status, text = post(base + "/v1/completions", dict(model="specjax-embedded", prompt="select", max_tokens=4,
                                                           temperature=0))
        assert status == 200 and json.loads(text)["choices"][0]["token_ids"]
    finally:
        process.terminate()
        process.wait(30)
