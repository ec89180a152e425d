"""``autoglm-export serve``: an OpenAI-compatible chat API over an artifact or the reference model.

The point is that an app's own client code (the ``openai`` package, langchain-openai's ``ChatOpenAI``)
can talk to an exported artifact before it goes on a phone, so the wire format follows OpenAI's
``/v1/chat/completions``: messages with text, ``image_url`` parts (data: URLs or local paths) and
``input_audio`` parts (base64 wav), ``temperature``/``top_p``/``max_tokens``/``seed``/``stop``, usage counts,
server-sent-event streaming ending with ``data: [DONE]``, and OpenAI-style error JSON.

Thinking: ``enable_thinking`` (or vLLM's ``chat_template_kwargs.enable_thinking``) is the chat template's
switch; generated text between ``<think>`` and ``</think>`` is returned as ``reasoning_content``, apart
from ``content`` (``return_reasoning: false`` drops it). It is parsed as text, as servers do for GLM, since
a tokenizer need not have ``<think>`` as one token.

One model is in memory and one worker thread runs the generations, one at a time (a session holds one KV
cache). Requests wait in a bounded queue; when it is full a request gets 429 at once instead of waiting
without end. A client that goes away (closed stream or connection) cancels its generation before the next
decoder step. Request parsing, media decoding and prompt layout happen before a request is queued, so a
bad request is answered 4xx without waiting for the model.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import queue
import secrets
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import unquote, urlparse

import numpy as np
from starlette.requests import Request  # at module level: FastAPI resolves the endpoint's annotations here

from core.chat import has_thinking_switch, render
from core.errors import AutoglmExportError, BadInputError
from core.runner import Prompt, Runner

log = logging.getLogger("autoglm_export.serve")

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_QUEUE_SIZE = 8
MAX_STOP_STRINGS = 4
DISCONNECT_POLL_S = 0.05  # while the job runs: a gone client stops within about one decoder step
QUEUED_POLL_S = 0.5  # while it waits: it is skipped when its turn comes, so a slower poll costs nothing


# --- errors as OpenAI answers them ----------------------------------------------------------------


class APIError(Exception):
    """An answer with an HTTP error status and OpenAI's error body ({"error": {message, type, param, code}})."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --- the request -----------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A validated chat completion request, its prompt laid out (media preprocessed) ready to queue."""

    prompt: Prompt
    prompt_tokens: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    opens_thinking: bool  # the rendered prompt ends inside <think> (the answer starts as reasoning)
    return_reasoning: bool
    return_token_ids: bool


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise bad(f"'{name}' must be a number", name)
    if value < lo or value > hi or (lo_open and value == lo):
        raise bad(f"'{name}' is {value}; must be in {'(' if lo_open else '['}{lo}, {hi}]", name)
    return float(value)


def _integer(body: dict, name: str, lo: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"'{name}' must be an integer", name)
    if value < lo:
        raise bad(f"'{name}' is {value}; must be at least {lo}", name)
    return value


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false", name)
    return value


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"'stop' holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    return stops


def _thinking(body: dict) -> bool | None:
    """enable_thinking from the body (langchain's extra_body) or vLLM's chat_template_kwargs."""
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    value = body.get("enable_thinking", (kwargs or {}).get("enable_thinking"))
    if value is not None and not isinstance(value, bool):
        raise bad("'enable_thinking' must be true or false", "enable_thinking")
    return value


UNSUPPORTED = {
    "tools": "tool calling",
    "functions": "function calling",
    "response_format": "response formats",
}


def parse_request(body: Any, runner: Runner, model_name: str) -> ChatRequest:
    """Everything a request can get wrong, checked before it is queued (media decoded, prompt laid out)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required (a string)", "model")
    if model != model_name:
        raise APIError(404, f"The model '{model}' does not exist; this server serves '{model_name}'", param="model",
                       code="model_not_found")
    for key, what in UNSUPPORTED.items():
        if body.get(key) not in (None, [], {"type": "text"}):
            raise bad(f"'{key}': {what} is not supported by this server", key)
    if body.get("n") not in (None, 1):
        raise bad("'n' must be 1 (one choice per request)", "n")
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported by this server", "logprobs")
    options = dict(  # the cheap checks first: a bad option is refused before any media is decoded
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=_stops(body.get("stop")),
        stream=_flag(body, "stream", False),
        return_reasoning=_flag(body, "return_reasoning", True),
        return_token_ids=_flag(body, "return_token_ids", False),
    )
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    seed = _integer(body, "seed", 0)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = _flag(stream_options, "include_usage", False)
    cfg = runner.config
    thinking = _thinking(body)
    if thinking is not None and not has_thinking_switch(runner.template):
        raise bad(f"'enable_thinking': the chat template of '{cfg.name}' has no thinking switch", "enable_thinking")
    messages, image, audio = convert_messages(body.get("messages"), runner)
    prompt = Prompt(text="", image=image, audio=audio, thinking=thinking, messages=messages)
    try:
        segments = runner.segments(prompt)
    except BadInputError as e:
        code = "context_length_exceeded" if "max_seq_len" in str(e) else None
        raise bad(str(e), "messages", code) from None
    extra = {} if thinking is None else {"enable_thinking": thinking}
    rendered = render(runner.template, messages, add_generation_prompt=True, **extra)
    prompt_tokens = [t for s in segments for t in s.tokens]
    room = cfg.shape.max_seq_len - len(prompt_tokens)
    return ChatRequest(
        prompt=prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=min(max_tokens or room, room),
        seed=secrets.randbits(63) if seed is None else seed,
        include_usage=include_usage,
        opens_thinking=rendered.rstrip().endswith(THINK_OPEN),
        **options,
    )


# --- messages -> the template's messages, media decoded ----------------------------------------------


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def convert_messages(raw: Any, runner: Runner) -> tuple[list[dict[str, Any]], np.ndarray | None, np.ndarray | None]:
    """OpenAI messages as the chat template takes them, with the one image / audio preprocessed."""
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    media: dict[str, np.ndarray] = {}
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", where)
        role = ROLES.get(m.get("role"))
        if role is None:
            raise bad(f"{where}.role {m.get('role')!r}: expected one of {', '.join(ROLES)}", f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
        parts = [_part(p, f"{where}.content[{j}]", role, runner, media) for j, p in enumerate(content)]
        if role != "user":  # the template writes only text for these roles
            out.append({"role": role, "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": role, "content": parts})
    return out, media.get("image"), media.get("audio")


def _part(part: Any, where: str, role: str, runner: Runner, media: dict[str, np.ndarray]) -> dict[str, Any]:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise bad(f"{where} must be an object with a 'type'", where)
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"{where}.text must be a string", where)
        return {"type": "text", "text": part["text"]}
    if kind not in ("image_url", "input_audio"):
        raise bad(f"{where}: part type {kind!r} is not supported (text, image_url, input_audio)", where)
    if role != "user":
        raise bad(f"{where}: {kind} parts belong in user messages", where)
    media_kind = "image" if kind == "image_url" else "audio"
    if media_kind in media:
        raise bad(f"{where}: this model takes one {media_kind} per request", where, "too_many_media")
    cfg = runner.config
    if media_kind == "image":
        if cfg.vision is None:
            raise bad(f"{where}: model '{cfg.name}' has no vision encoder; it cannot take images", where, "unsupported_media")
        media["image"] = _image(part.get("image_url"), where, runner)
    else:
        if cfg.audio is None:
            raise bad(f"{where}: model '{cfg.name}' has no speech front-end; it cannot take audio", where, "unsupported_media")
        media["audio"] = _audio(part.get("input_audio"), where, runner)
    return {"type": media_kind}


def _image(spec: Any, where: str, runner: Runner) -> np.ndarray:
    """Pixels of an image_url part: a data: URL (base64), a file:// URL or a local path; decoded as the CLI does."""
    from PIL import Image

    from core import preprocess

    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad(f"{where}.image_url.url must be a string", where)
    cfg = runner.config
    if url.startswith("data:"):
        data = _data_url(url, where)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                img = im.convert("RGB")
        except Exception:  # Pillow raises many types on a corrupt file
            raise bad(f"{where}: cannot decode image: not an image file Pillow can read (PNG, JPEG, ...)", where,
                      "invalid_image") from None
        return preprocess.image_to_pixels(img, cfg.shape.image_size, cfg.vision.image_mean, cfg.vision.image_std)
    path = _local_path(url, where)
    try:
        return runner.pixels(str(path))
    except BadInputError as e:
        raise bad(f"{where}: {e}", where, "invalid_image") from None


def _audio(spec: Any, where: str, runner: Runner) -> np.ndarray:
    """log-mel of an input_audio part ({"data": base64, "format": "wav"}), decoded by the CLI's own wav reader."""
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise bad(f"{where}.input_audio must be an object with base64 'data'", where)
    fmt = spec.get("format", "wav")
    if fmt != "wav":
        raise bad(f"{where}.input_audio.format {fmt!r}: only 'wav' is supported", where)
    data = _base64(spec["data"], where)
    with tempfile.TemporaryDirectory(prefix="autoglm-serve-") as tmp:
        path = Path(tmp) / "input.wav"
        path.write_bytes(data)
        try:
            return runner.mel(str(path))
        except BadInputError as e:
            raise bad(f"{where}: {str(e).replace(str(path), 'input_audio')}", where, "invalid_audio") from None


def _data_url(url: str, where: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad(f"{where}: a data: URL must be base64 (data:image/png;base64,...)", where)
    return _base64(payload, where)


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad(f"{where}: not valid base64", where) from None


def _local_path(url: str, where: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise bad(f"{where}: remote URLs are not fetched; send a data: URL or a local path", where)
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
    if not path.is_file():
        raise bad(f"{where}: {path}: no such file", where, "invalid_image")
    return path


# --- text out: detokenize, stop strings, reasoning apart from content --------------------------------


def split_reasoning(text: str, opened: bool) -> tuple[str, str]:
    """(reasoning, content) of generated text; ``opened``: the prompt already opened <think>."""
    if not opened:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return "", text
        text = stripped[len(THINK_OPEN):]
    end = text.find(THINK_CLOSE)
    if end < 0:
        return text, ""
    return text[:end], text[end + len(THINK_CLOSE):].lstrip("\n")


def _partial_suffix(text: str, marks: list[str]) -> int:
    """Length of the longest end of ``text`` that may be the start of one of ``marks`` (held back while streaming)."""
    longest = 0
    for mark in marks:
        for k in range(min(len(mark) - 1, len(text)), longest, -1):
            if text.endswith(mark[:k]):
                longest = k
                break
    return longest


class TextState:
    """The answer so far, as deltas: stop strings cut it, text that may still become a marker is held back.

    Whole and streamed answers come from the same state, so the streamed deltas add up to the whole answer.
    """

    def __init__(self, tokenizer: Any, stop: list[str], opens_thinking: bool):
        self.tokenizer, self.stop, self.opened = tokenizer, stop, opens_thinking
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string was met
        self.sent = ("", "")

    def add(self, token: int) -> tuple[str, str]:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True
            return self._delta(self.text)
        self.text = text
        return self._delta(text[: len(text) - self._held(text)])

    def finish(self) -> tuple[str, str]:
        return self._delta(self.text)

    def _held(self, text: str) -> int:
        held = len(text) - len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence
        marks = self.stop + [THINK_CLOSE]
        stripped = text.lstrip()
        if not self.opened and len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
            return len(text)  # may still open <think>
        return max(held, _partial_suffix(text, marks))

    def _delta(self, text: str) -> tuple[str, str]:
        now = split_reasoning(text, self.opened)
        out = tuple(n[len(s):] if n.startswith(s) else "" for n, s in zip(now, self.sent))
        self.sent = tuple(n if n.startswith(s) else s for n, s in zip(now, self.sent))
        return out  # type: ignore[return-value]

    @property
    def answer(self) -> tuple[str, str]:
        return self.sent


# --- the engine: one model, one worker, a bounded queue ----------------------------------------------


@dataclass
class Job:
    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    cancelled_by_client: bool = False  # the client went away (set by _watch_disconnect)
    stopped: bool = False  # a stop string ended the answer (the worker is then told to stop, not counted as cancelled)
    started: bool = False  # the worker took it
    released: bool = False  # its handler has returned (Engine.release)

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shut down)
            pass


class Engine:
    """Runs queued generations one at a time on the one runner; counts what happened to each request."""

    def __init__(self, runner: Runner, queue_size: int = DEFAULT_QUEUE_SIZE):
        if queue_size < 1:
            raise BadInputError(f"--queue-size {queue_size}: must be at least 1")
        self.runner = runner
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.stats = {"completed": 0, "cancelled": 0, "refused": 0, "failed": 0, "generated_tokens": 0}
        self.busy = False
        self.closed = False
        self.open_handlers = 0  # requests accepted whose handler has not returned yet (0 when idle: nothing leaks)
        self.thread = threading.Thread(target=self._work, name="autoglm-serve-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.closed:
            raise APIError(503, "the server is shutting down", type="server_error", code="unavailable")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.stats["refused"] += 1
            raise APIError(429, f"the request queue is full ({self.jobs.maxsize} waiting); retry later",
                           type="rate_limit_error", code="queue_full") from None
        self.open_handlers += 1

    def release(self, job: Job) -> None:
        """The job's handler is done with it: the worker stops it (if still running) and it no longer counts."""
        job.cancelled.set()  # a no-op once the job is done
        if not job.released:
            job.released = True
            self.open_handlers -= 1

    def close(self) -> None:
        self.closed = True
        while True:  # answer whoever still waits, then stop the worker
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", APIError(503, "the server is shutting down", type="server_error", code="unavailable"))
        try:
            self.jobs.put_nowait(None)
        except queue.Full:
            pass

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client went away while it waited
                self.stats["cancelled"] += 1
                job.emit("cancelled")  # so its handler returns instead of waiting for ever
                continue
            self.busy = job.started = True
            try:
                self._run(job)
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        r = job.request
        steps = self.runner.stream(r.prompt, r.max_tokens, r.temperature, r.top_p, r.seed, stop_at_eos=True)
        try:
            while True:
                if job.cancelled.is_set():
                    steps.close()
                    self.stats["completed" if job.stopped else "cancelled"] += 1
                    job.emit("cancelled")
                    return
                try:
                    token = next(steps)
                except StopIteration as done:
                    self.stats["completed"] += 1
                    job.emit("done", done.value.stopped_by_eos)
                    return
                self.stats["generated_tokens"] += 1
                job.emit("token", token)
        except AutoglmExportError as e:
            self.stats["failed"] += 1
            job.emit("error", APIError(400 if isinstance(e, BadInputError) else 500, str(e),
                                       type="invalid_request_error" if isinstance(e, BadInputError) else "server_error"))
        except Exception:  # the runtime failed: logged here, never sent to the client
            log.exception("generation failed")
            self.stats["failed"] += 1
            job.emit("error", APIError(500, "the model failed while generating; see the server log", type="server_error"))


# --- HTTP --------------------------------------------------------------------------------------------


def create_app(runner: Runner, model_name: str, queue_size: int = DEFAULT_QUEUE_SIZE, label: str = ""):
    """The FastAPI app: /v1/models, /v1/chat/completions, /health; its engine is ``app.state.engine``."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        app.state.engine.close()

    app = FastAPI(title="autoglm-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = Engine(runner, queue_size)
    app.state.model_name = model_name

    def error_response(e: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else None
        return error_response(APIError(e.status_code, str(e.detail), code=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e: RequestValidationError):
        return error_response(bad(f"invalid request: {e.errors()}"))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error")
        return error_response(APIError(500, "internal server error; see the server log", type="server_error"))

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "autoglm-export",
                "max_model_len": runner.config.shape.max_seq_len, "root": label or model_name}

    @app.get("/health")
    async def health():
        engine = app.state.engine
        return {"status": "ok", "model": model_name, "busy": engine.busy, "queued": engine.jobs.qsize(),
                "queue_size": engine.jobs.maxsize, "open_requests": engine.open_handlers, **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        chat = await asyncio.to_thread(parse_request, body, runner, model_name)
        job = Job(chat, asyncio.get_running_loop())
        engine = app.state.engine
        engine.submit(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        reply = Reply(chat, runner.tokenizer, model_name)
        if chat.stream:
            return StreamingResponse(_sse(reply, job, watcher, engine), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await reply.collect(job)
        finally:
            engine.release(job)
            watcher.cancel()
        if job.cancelled_by_client:
            return JSONResponse({}, status_code=499)
        return reply.whole()

    return app


async def _watch_disconnect(request, job: Job) -> None:
    """Cancel the job when the client goes away (uvicorn does not fail the sends of a stream to a closed socket)."""
    # Ticks at DISCONNECT_POLL_S throughout and asks the socket every tick once the worker has the job, every
    # QUEUED_POLL_S while it waits: a long queued sleep would let a job that starts mid-sleep run that long
    # for a client already gone.
    asked = -float("inf")
    try:
        while not job.cancelled.is_set():
            now = time.monotonic()
            if job.started or now - asked >= QUEUED_POLL_S:
                asked = now
                if await request.is_disconnected():
                    job.cancelled_by_client = True
                    job.cancelled.set()
                    return
            await asyncio.sleep(DISCONNECT_POLL_S)
    except asyncio.CancelledError:
        pass


class Reply:
    """Turns a job's token events into OpenAI's answer: whole, or chunk by chunk."""

    def __init__(self, chat: ChatRequest, tokenizer: Any, model_name: str):
        self.chat = chat
        self.state = TextState(tokenizer, chat.stop, chat.opens_thinking)
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name
        self.finish_reason: str | None = None
        self.pending_ids: list[int] = []

    async def events(self, job: Job) -> AsyncIterator[tuple[str, str]]:
        """(reasoning, content) deltas as tokens arrive; sets finish_reason at the end; raises the job's APIError."""
        while True:
            kind, value = await job.events.get()
            if kind == "token":
                self.pending_ids.append(value)
                delta = self.state.add(value)
                if self.state.stopped:
                    job.stopped = True
                    job.cancelled.set()  # a stop string: the worker stops at its next step
                    self.finish_reason = "stop"
                    yield delta
                    yield self.state.finish()
                    return
                yield delta
            elif kind == "done":
                self.finish_reason = "stop" if value else "length"
                yield self.state.finish()
                return
            elif kind == "cancelled":
                self.finish_reason = self.finish_reason or "cancelled"
                return
            else:
                raise value

    async def collect(self, job: Job) -> None:
        async for _ in self.events(job):
            pass

    def usage(self) -> dict[str, int]:
        n_prompt, n_out = len(self.chat.prompt_tokens), len(self.state.tokens)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def whole(self) -> dict[str, Any]:
        reasoning, content = self.state.answer
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if self.chat.return_reasoning and (reasoning or self.chat.opens_thinking):
            message["reasoning_content"] = reasoning
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": self.finish_reason,
                                  "logprobs": None}
        out = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
               "choices": [choice], "usage": self.usage()}
        if self.chat.return_token_ids:
            choice["token_ids"] = list(self.state.tokens)
            out["prompt_token_ids"] = list(self.chat.prompt_tokens)
        return out

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        if self.chat.return_token_ids:
            choice["token_ids"], self.pending_ids = self.pending_ids, []
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(self, reasoning: str, content: str) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        if reasoning and self.chat.return_reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        return delta or None


async def _sse(reply: Reply, job: Job, watcher: asyncio.Task, engine: Engine) -> AsyncIterator[str]:
    """Server-sent events: a role chunk, one chunk per text delta, the finish chunk, usage if asked, [DONE]."""
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        try:
            async for reasoning, content in reply.events(job):
                delta = reply.delta(reasoning, content)
                if delta:
                    yield reply.chunk(delta)
        except APIError as e:  # the headers are sent: the error goes in the stream, as OpenAI-compatible servers do
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        if reply.finish_reason == "cancelled":
            return
        yield reply.chunk({}, reply.finish_reason)
        if reply.chat.include_usage:
            usage = {"id": reply.id, "object": "chat.completion.chunk", "created": reply.created, "model": reply.model,
                     "choices": [], "usage": reply.usage()}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        engine.release(job)
        watcher.cancel()


# --- running it --------------------------------------------------------------------------------------


def open_model(artifact: str | Path | None = None, preset: str | None = "tiny", checkpoint: str | Path | None = None,
               layers: int | None = None):
    """The Loaded model to serve: an artifact (verified as generate --artifact does) or the reference."""
    from exporter import pipeline

    if artifact is not None:
        if checkpoint is not None or layers is not None:
            raise BadInputError("serve an ARTIFACT_DIR or a reference (--preset / --checkpoint / --layers), not both")
        return pipeline.open_artifact(artifact)
    return pipeline.open_reference(preset, checkpoint, layers)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so a taken port is one line, not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise BadInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_server(loaded, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                queue_size: int = DEFAULT_QUEUE_SIZE, log_level: str = "info", sock: socket.socket | None = None):
    """(uvicorn.Server, its socket, the app) for ``loaded``; ``server.run(sockets=[sock])`` serves until stopped."""
    import uvicorn

    runner = Runner(loaded.session, loaded.config, loaded.tokenizer)
    app = create_app(runner, model_name or loaded.config.name, queue_size, loaded.label)
    sock = sock or listen(host, port)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config), sock, app


def serve(loaded, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          queue_size: int = DEFAULT_QUEUE_SIZE, sock: socket.socket | None = None) -> None:
    """Serve until interrupted (uvicorn handles Ctrl-C / SIGTERM, finishing what is in flight)."""
    server, sock, _ = make_server(loaded, host, port, model_name, queue_size, sock=sock)
    with sock:
        server.run(sockets=[sock])
