"""An OpenAI-compatible HTTP server over the continuous-batching ``Scheduler`` (issue 23).

``/v1/completions`` and ``/v1/chat/completions`` (with ``"stream": true``: server-sent events,
one chunk per step that emitted tokens, then ``data: [DONE]``), ``/v1/models`` and ``/metrics``
(Prometheus text: queue length, running requests, pages in use, tokens per pass, acceptance).

One thread (``ServingLoop``) steps the scheduler; the HTTP handlers run on uvicorn's event loop
and only submit, cancel and wait for events, so a slow client never holds a step. A request ends
when it finishes, when its client disconnects (a stream closed early is cancelled and its pages
released at once) or when it runs past ``timeout_s``. Bad requests get a 4xx with an OpenAI-style
``{"error": {...}}`` body: 400 for a malformed body or bad values (the scheduler's own checks:
prompt too long, sampling values), 404 for an unknown model, 429 when the queue is full.

Binds 127.0.0.1 by default: the server has no authentication. FastAPI and uvicorn are the
optional ``serve`` extra (``pip install specjax[serve]``), imported only here.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations as objects, and
# the request class is imported inside create_app (FastAPI is an optional extra).
import argparse
import asyncio
import collections
import json
import random
import threading
import time
from typing import Any, AsyncIterator, Callable, Hashable, Optional, Sequence, Union

from specjax.engine.scheduler import Event, QueueFull, Request, Scheduler
from specjax.models.chat import ChatTemplateError, encode_chat
from specjax.models.loading import Model

Listener = Callable[[Union[Event, BaseException]], None]
# ServingLoop.metrics' counts since start (Prometheus counters, "_total"); its other keys are gauges.
COUNTERS = ("steps", "passes", "emitted", "drafted", "accepted", "finished", "cancelled", "timed_out", "rejected",
            "failed_steps")


class ServingLoop:
    """One thread steps a ``Scheduler``; other threads submit, cancel and receive events.

    The scheduler is plain Python, not thread-safe: every call holds one lock, a step
    included (milliseconds). A listener gets each ``Event`` of its request, or an exception
    (``TimeoutError`` past ``timeout_s``, or what a failed step raised, after which every
    request in flight is cancelled: the loop itself keeps serving).
    """

    def __init__(self, scheduler: Scheduler, timeout_s: Optional[float] = None):
        self.scheduler, self.timeout_s = scheduler, timeout_s
        self.counters: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._listeners: dict[Hashable, Listener] = {}
        self._deadlines: dict[Hashable, float] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="specjax-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request, listener: Listener) -> Hashable:
        """Queue a request (raises the scheduler's ValueError / QueueFull); returns its id."""
        with self._lock:
            try:
                rid = self.scheduler.submit(request)
            except QueueFull:
                self.counters["rejected"] += 1
                raise
            self._listeners[rid] = listener
            if self.timeout_s is not None:
                self._deadlines[rid] = time.monotonic() + self.timeout_s
            self._wake.notify()
        return rid

    def cancel(self, rid: Hashable) -> None:
        """Cancel a request that has not ended (no-op otherwise); its pages are released now."""
        with self._lock:
            if self.scheduler.cancel(rid):
                self.counters["cancelled"] += 1
            self._forget(rid)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            alloc = self.scheduler.allocator
            counts = dict(self.counters, queue_length=self.scheduler.num_queued,
                          requests_running=self.scheduler.num_running, pages_in_use=alloc.num_in_use,
                          pages_total=alloc.num_pages)
        for key in COUNTERS:
            counts.setdefault(key, 0)
        counts["tokens_per_pass"] = counts["emitted"] / max(counts["passes"], 1)
        counts["acceptance"] = counts["accepted"] / max(counts["drafted"], 1)
        return counts

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self.scheduler.has_work():
                    self._wake.wait()
                if self._closed:
                    return
                self._expire()
                self._step()

    def _step(self) -> None:
        """One scheduler step under the lock; events go to their listeners."""
        try:
            events = self.scheduler.step()
        except Exception as err:  # a broken step must not stop the server: fail what was in flight
            self.counters["failed_steps"] += 1
            for rid, listener in list(self._listeners.items()):
                self.scheduler.cancel(rid)
                self._forget(rid)
                listener(err)
            return
        stats = self.scheduler.last_step
        self.counters.update(steps=1, passes=len(events), emitted=stats.emitted, drafted=stats.drafted,
                             accepted=stats.accepted)
        for event in events:
            listener = self._listeners.get(event.rid)
            if event.finished:
                self.counters["finished"] += 1
                self._forget(event.rid)
            if listener is not None:
                listener(event)

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [rid for rid, deadline in self._deadlines.items() if deadline <= now]:
            listener = self._listeners[rid]
            self.scheduler.cancel(rid)
            self.counters["timed_out"] += 1
            self._forget(rid)
            listener(TimeoutError(f"the request ran past the server's timeout of {self.timeout_s} s"))

    def _forget(self, rid: Hashable) -> None:
        self._listeners.pop(rid, None)
        self._deadlines.pop(rid, None)


# ---------------------------------------------------------------- request parsing


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "stop", "logit_bias", "tools", "functions",
               "response_format")


def _number(body: dict, key: str, default, kind: type, low=None, high=None):
    """body[key] (or the default) checked as an int or float within [low, high]."""
    value = body.get(key, default)
    if value is None:
        value = default
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise ApiError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}", key)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"{key} must lie in [{low}, {high}], got {value!r}", key)
    return kind(value)


def parse_sampling(body: dict, served_name: str) -> dict:
    """The fields common to both endpoints, checked: Request keyword arguments plus ``stream``."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if body.get("model") is None:
        raise ApiError(400, "model is required", "model")
    if body["model"] != served_name:
        raise ApiError(404, f"the model {body['model']!r} does not exist; this server serves {served_name!r}",
                       "model", "model_not_found")
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], 0):
            raise ApiError(400, f"{key} is not supported by this server", key)
    if body.get("n", 1) != 1 or body.get("best_of", 1) != 1:
        raise ApiError(400, "only n = 1 (and best_of = 1) is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", "stream")
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    top_k = _number(body, "top_k", 0, int, low=-1)
    return dict(max_new_tokens=_number(body, max_key, 16, int, low=1),
                temperature=_number(body, "temperature", 1.0, float, low=0.0, high=100.0),
                top_p=_number(body, "top_p", 1.0, float, low=0.0, high=1.0), top_k=max(top_k, 0),
                seed=_number(body, "seed", random.getrandbits(32), int, low=0, high=2 ** 32 - 1), stream=stream)


def completion_prompt(model: Model, body: dict) -> list[int]:
    """``prompt``: a string (needs the model's tokenizer) or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        return list(model.tokenizer.encode(prompt).ids)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                   "prompt")


def chat_prompt(model: Model, body: dict) -> list[int]:
    try:
        return encode_chat(model, body.get("messages"))
    except ChatTemplateError as err:
        raise ApiError(400, str(err), "messages") from err


# ---------------------------------------------------------------- the app


class _Decoder:
    """Text deltas of a growing token list: the decoded text past what was sent, held back while it
    ends inside a multi-byte character."""

    def __init__(self, model: Model):
        self.tokenizer, self.tokens, self.sent = model.tokenizer, [], ""

    def add(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(tokens)
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def text(self) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(self.tokens)


def create_app(model: Model, loop: ServingLoop, served_name: str):
    """The FastAPI app of one model served through ``loop``."""
    from fastapi import FastAPI, Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    app = FastAPI(title="specjax", docs_url=None, redoc_url=None)
    eos_ids = set(model.config.eos_token_ids)

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    async def read_body(http: HttpRequest) -> dict:
        try:
            return await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from err

    def submit(prompt: list[int], fields: dict) -> tuple[Hashable, asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        events = asyncio.get_running_loop()
        request = Request(prompt, fields["max_new_tokens"], fields["temperature"], fields["top_k"],
                          fields["top_p"], fields["seed"])
        try:
            rid = loop.submit(request, lambda event: events.call_soon_threadsafe(queue.put_nowait, event))
        except QueueFull as err:
            raise ApiError(429, f"the server is busy: {err}") from err
        except ValueError as err:
            raise ApiError(400, str(err)) from err
        return rid, queue

    async def events_of(rid: Hashable, queue: asyncio.Queue) -> AsyncIterator[Event]:
        """The request's events until it ends; cancels it when the consumer stops early (a disconnect)."""
        try:
            while True:
                event = await queue.get()
                if isinstance(event, TimeoutError):
                    raise ApiError(503, str(event), code="timeout")
                if isinstance(event, BaseException):
                    raise ApiError(500, f"the step failed: {event}")
                yield event
                if event.finished:
                    return
        finally:
            loop.cancel(rid)

    def finish_reason(tokens: list[int], max_new: int) -> str:
        return "stop" if (tokens and tokens[-1] in eos_ids) or len(tokens) < max_new else "length"

    async def respond(http: HttpRequest, chat: bool):
        body = await read_body(http)
        fields = parse_sampling(body, served_name)
        prompt = chat_prompt(model, body) if chat else completion_prompt(model, body)
        rid, queue = submit(prompt, fields)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        decoder = _Decoder(model)

        def choice(text: str, tokens: list[int], reason: Optional[str], first: bool = False) -> dict:
            if not fields["stream"]:
                content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            elif chat:
                content = {"delta": dict({"role": "assistant"} if first else {}, **({"content": text} if text
                                                                                    or first else {}))}
            else:
                content = {"text": text}
            return dict(index=0, token_ids=tokens, finish_reason=reason, **content)

        def usage() -> dict:
            n = len(decoder.tokens)
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}

        if not fields["stream"]:
            async for event in events_of(rid, queue):
                decoder.add(event.tokens)
            reason = finish_reason(decoder.tokens, fields["max_new_tokens"])
            return {"id": ident, "object": kind, "created": created, "model": served_name,
                    "choices": [choice(decoder.text(), decoder.tokens, reason)], "usage": usage()}

        async def stream():
            chunk = {"id": ident, "object": kind + ".chunk" if chat else kind, "created": created,
                     "model": served_name}
            first = True
            try:
                async for event in events_of(rid, queue):
                    reason = finish_reason(decoder.tokens + event.tokens, fields["max_new_tokens"]) \
                        if event.finished else None
                    delta = decoder.add(event.tokens)
                    payload = dict(chunk, choices=[choice(delta, event.tokens, reason, first)])
                    if event.finished:
                        payload["usage"] = usage()
                    first = False
                    yield f"data: {json.dumps(payload)}\n\n"
            except ApiError as err:
                yield f"data: {json.dumps(err.body())}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await respond(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await respond(http, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "owned_by": "specjax"}]}

    @app.get("/metrics")
    async def metrics():
        lines = []
        for key, value in sorted(loop.metrics().items()):
            name, kind = (f"specjax_{key}_total", "counter") if key in COUNTERS else (f"specjax_{key}", "gauge")
            lines += [f"# TYPE {name} {kind}", f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    return app


# ---------------------------------------------------------------- specjax serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specjax serve", description="Serve a model over an OpenAI-compatible "
                                     "HTTP API with continuous batching and speculative decoding.")
    parser.add_argument("--model", default=None, help="model directory, GGUF file, known name or hf:Org/Repo "
                        "(default: the embedded model)")
    parser.add_argument("--served-model-name", default=None, help="the name clients send (default: --model's)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: no authentication)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--drafter", choices=("prompt-lookup", "suffix", "none"), default="suffix")
    parser.add_argument("--max-slots", type=int, default=8, help="sequences per step")
    parser.add_argument("--num-pages", type=int, default=1024)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-pages-per-seq", type=int, default=128)
    parser.add_argument("--max-tree", type=int, default=8, help="draft nodes per slot and step, at most")
    parser.add_argument("--tree-size", choices=("auto", "max"), default="auto",
                        help="auto: each slot verifies the draft nodes that pay for their rows (step costs timed "
                             "per row bucket, claims calibrated per request); max: whole proposals up to --max-tree")
    parser.add_argument("--prefill-budget", type=int, default=256, help="prompt rows per step")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before a request is cancelled")
    parser.add_argument("--attention", choices=("auto", "xla", "pallas"), default="auto")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    import uvicorn

    from specjax.drafters.prompt_lookup import PromptLookupDrafter
    from specjax.drafters.suffix_index import SuffixDecodingDrafter
    from specjax.models.embedded import default_model_dir
    from specjax.models.loading import load_model
    from specjax.models.pull import resolve_model

    args = build_parser().parse_args(argv)
    model = load_model(resolve_model(args.model) if args.model else default_model_dir())
    drafter: Any = {"prompt-lookup": PromptLookupDrafter, "suffix": SuffixDecodingDrafter,
                    "none": lambda: None}[args.drafter]()
    scheduler = Scheduler(model, max_slots=args.max_slots, num_pages=args.num_pages, page_size=args.page_size,
                          max_pages_per_seq=args.max_pages_per_seq, max_tree=args.max_tree,
                          prefill_budget=args.prefill_budget, drafter=drafter, attention=args.attention,
                          max_queue=args.max_queue, auto_tree=args.tree_size == "auto")
    loop = ServingLoop(scheduler, timeout_s=args.timeout)
    name = args.served_model_name or args.model or "specjax-embedded"
    try:
        uvicorn.run(create_app(model, loop, name), host=args.host, port=args.port)
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
