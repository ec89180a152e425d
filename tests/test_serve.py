"""autoglm-export serve: an OpenAI-compatible server, driven by the official clients (issue 19).

Each server runs in this process on 127.0.0.1 (a free port, uvicorn in a thread) over a real model: the tiny
reference, a transformers-written Glm4v checkpoint with the GLM-4.1V chat template (it has the thinking switch),
and an ORT fp32 artifact of tiny. Answers are compared with ``autoglm-export generate`` token for token.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from typer.testing import CliRunner

from cli import app
from glm_checkpoint import write_glm_checkpoint

openai = pytest.importorskip("openai")

PROMPT = "Open the settings and turn on Wi-Fi."


# --- servers ---------------------------------------------------------------------------------------


class Server:
    """A uvicorn server over a Loaded model, in a thread of this process."""

    def __init__(self, loaded, queue_size: int = 8, model_name: str | None = None):
        from exporter.serve import make_server

        self.server, self.sock, self.app = make_server(loaded, "127.0.0.1", 0, model_name, queue_size, log_level="warning")
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    @property
    def engine(self):
        return self.app.state.engine

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="EMPTY", max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="module")
def tiny_server():
    from exporter.pipeline import open_reference

    s = Server(open_reference("tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def glm_ckpt(tmp_path_factory):
    """A Glm4v checkpoint written by transformers, with GLM4V_CHAT_TEMPLATE (opens the answer with <think>)."""
    pytest.importorskip("transformers")

    d = tmp_path_factory.mktemp("glm_ckpt")
    write_glm_checkpoint(d)
    (d / "generation_config.json").unlink(missing_ok=True)
    return d


@pytest.fixture(scope="module")
def glm_server(glm_ckpt):
    from exporter.pipeline import open_reference

    s = Server(open_reference(None, glm_ckpt), model_name="autoglm-phone-9b")
    yield s
    s.stop()


def _generate(*args) -> tuple[list[int], str, int]:
    """(tokens, text, prompt token count) printed by `autoglm-export generate`."""
    r = CliRunner().invoke(app, ["generate", *args])
    assert r.exit_code == 0, r.output
    tokens = json.loads(re.search(r"tokens: (\[.*\])", r.output).group(1))
    text = eval(re.search(r"text: (.*)", r.output).group(1))  # the repr generate prints
    n_prompt = int(re.search(r"prompt tokens: (\d+)", r.output).group(1))
    return tokens, text, n_prompt


def _user(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- answers equal generate -------------------------------------------------------------------------


def test_models_lists_the_served_model(tiny_server):
    models = tiny_server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_greedy_answer_and_usage_equal_generate(tiny_server):
    tokens, text, n_prompt = _generate("--prompt", PROMPT, "--max-new-tokens", "12")
    assert len(tokens) == 12  # no eos within 12 on tiny: the comparison covers all 12 steps
    r = tiny_server.client().chat.completions.create(
        model="tiny", messages=_user(), temperature=0, max_tokens=12, extra_body={"return_token_ids": True}
    )
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == tokens
    assert choice.message.content == text
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)


def test_stream_is_sse_ending_with_done_and_adds_up_to_the_whole_answer(tiny_server):
    client = tiny_server.client()
    whole = client.chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 10
    with httpx.stream("POST", f"{tiny_server.url}/v1/chat/completions", timeout=30,
                      json={"model": "tiny", "messages": _user(), "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_sampling_options_and_stop(tiny_server):
    client = tiny_server.client()
    kw = dict(model="tiny", messages=_user(), max_tokens=12, temperature=0.9, top_p=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    tokens, text, _ = _generate("--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0.9", "--top-p", "0.9",
                                "--seed", "7")
    assert a == b == text  # same seed, same sampled answer as generate
    greedy = client.chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=12)
    full = greedy.choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and full.index(stop) > 0
    cut = client.chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=12, stop=stop,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_multi_turn_renders_the_whole_conversation(tiny_server):
    from core.chat import render
    from core.runner import load_tokenizer

    runner_cfg = tiny_server.engine.runner.config
    messages = [{"role": "system", "content": "You are a phone agent."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": PROMPT}]
    r = tiny_server.client().chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=2,
                                                     extra_body={"return_token_ids": True})
    expected = load_tokenizer(runner_cfg).encode(render(tiny_server.engine.runner.template, messages), add_special_tokens=False).ids
    assert r.model_extra["prompt_token_ids"] == list(expected)
    assert r.usage.prompt_tokens == len(expected) > 20


def test_image_and_audio_parts_equal_generate_with_the_files(tiny_server, media):
    tokens, _, n_prompt = _generate("--prompt", media["prompt"], "--image", str(media["image"]), "--audio",
                                    str(media["audio"]), "--max-new-tokens", "6")
    image_b64 = base64.b64encode(media["image"].read_bytes()).decode()
    audio_b64 = base64.b64encode(media["audio"].read_bytes()).decode()
    mime = "jpeg" if media["image"].suffix.lower() in (".jpg", ".jpeg") else "png"
    for image_url in (f"data:image/{mime};base64,{image_b64}", str(media["image"]), media["image"].resolve().as_uri()):
        parts = [{"type": "image_url", "image_url": {"url": image_url}},
                 {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}},
                 {"type": "text", "text": media["prompt"]}]
        r = tiny_server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=6,
            extra_body={"return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == tokens, image_url[:40]
        assert r.usage.prompt_tokens == n_prompt


# --- thinking ----------------------------------------------------------------------------------------


def test_thinking_on_returns_reasoning_content_apart_from_content(glm_server, glm_ckpt):
    tokens, text, _ = _generate("--checkpoint", str(glm_ckpt), "--prompt", PROMPT, "--thinking", "--max-new-tokens", "8")
    assert "</think>" not in text and text.strip()  # random weights never close the block: all of it is reasoning
    client = glm_server.client()
    kw = dict(model="autoglm-phone-9b", messages=_user(), temperature=0, max_tokens=8)
    r = client.chat.completions.create(extra_body={"enable_thinking": True, "return_reasoning": True,
                                                   "return_token_ids": True}, **kw)
    msg = r.choices[0].message
    assert r.choices[0].model_extra["token_ids"] == tokens
    assert msg.model_extra["reasoning_content"] == text
    assert msg.content == ""
    chunks = list(client.chat.completions.create(stream=True, extra_body={"enable_thinking": True, "return_reasoning": True}, **kw))
    assert "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices) == text
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    hidden = client.chat.completions.create(extra_body={"enable_thinking": True, "return_reasoning": False}, **kw)
    assert "reasoning_content" not in (hidden.choices[0].message.model_extra or {})
    assert hidden.choices[0].message.content == ""


def test_thinking_off_answers_in_content(glm_server, glm_ckpt):
    tokens, text, _ = _generate("--checkpoint", str(glm_ckpt), "--prompt", PROMPT, "--no-thinking", "--max-new-tokens", "8")
    r = glm_server.client().chat.completions.create(
        model="autoglm-phone-9b", messages=_user(), temperature=0, max_tokens=8,
        extra_body={"enable_thinking": False, "return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == tokens
    assert r.choices[0].message.content == text
    assert not (r.choices[0].message.model_extra or {}).get("reasoning_content")


def test_langchain_chat_openai_as_in_the_write_up(glm_server, glm_ckpt):
    lc = pytest.importorskip("langchain_openai")
    _, thinking_text, _ = _generate("--checkpoint", str(glm_ckpt), "--prompt", PROMPT, "--thinking", "--max-new-tokens", "8")
    _, plain_text, _ = _generate("--checkpoint", str(glm_ckpt), "--prompt", PROMPT, "--no-thinking", "--max-new-tokens", "8")
    assert thinking_text.strip() and plain_text.strip()

    def chat(thinking: bool):
        return lc.ChatOpenAI(model="autoglm-phone-9b", base_url=f"{glm_server.url}/v1", api_key="EMPTY", streaming=True,
                             temperature=0, max_tokens=8, max_retries=0,
                             extra_body={"enable_thinking": thinking, "return_reasoning": True})

    on = list(chat(True).stream(PROMPT))
    assert "".join(c.content for c in on) == ""  # the reasoning stays out of the answer
    off = chat(False).invoke(PROMPT)
    assert off.content == plain_text


def test_thinking_switch_refused_where_the_template_has_none(tiny_server):
    with pytest.raises(openai.BadRequestError) as e:
        tiny_server.client().chat.completions.create(model="tiny", messages=_user(), extra_body={"enable_thinking": True})
    assert "no thinking switch" in e.value.body["message"]


def test_reasoning_split_is_the_same_whole_and_token_by_token(tiny_tokenizer):
    from exporter.serve import TextState, split_reasoning

    cases = [("<think>plan the taps</think>\nTap Settings.", False, ("plan the taps", "Tap Settings.")),
             ("plan the taps</think>\nTap Settings.", True, ("plan the taps", "Tap Settings.")),
             ("still thinking", True, ("still thinking", "")),
             ("Tap <b>Settings</b>.", False, ("", "Tap <b>Settings</b>."))]
    for text, opened, expected in cases:
        assert split_reasoning(text, opened) == expected
        ids = tiny_tokenizer.encode(text, add_special_tokens=False).ids
        assert len(ids) > 5  # several tokens: markers arrive split across them
        state = TextState(tiny_tokenizer, [], opened)
        got = ["", ""]
        for t in ids:
            for k, d in enumerate(state.add(t)):
                got[k] += d
        for k, d in enumerate(state.finish()):
            got[k] += d
        assert tuple(got) == expected, text


# --- errors -------------------------------------------------------------------------------------------


def _post(server, body, raw: bytes | None = None) -> httpx.Response:
    url = f"{server.url}/v1/chat/completions"
    if raw is not None:
        return httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
    return httpx.post(url, json=body, timeout=30)


def test_bad_requests_are_openai_error_json_with_4xx(tiny_server, glm_server, tmp_path, media):
    long = " ".join(["word"] * 400)
    bad_png = base64.b64encode(b"not an image").decode()
    wav = base64.b64encode(b"RIFF0000WAVEfmt ").decode()
    cases = [
        (tiny_server, {"model": "gpt-4o", "messages": _user()}, 404, "model_not_found"),
        (tiny_server, {"messages": _user()}, 400, None),
        (tiny_server, {"model": "tiny", "messages": []}, 400, None),
        (tiny_server, {"model": "tiny", "messages": "hi"}, 400, None),
        (tiny_server, {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, None),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, 400, None),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(long)}, 400, "context_length_exceeded"),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{bad_png}"}}]}]}, 400, "invalid_image"),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}, 400, None),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(tmp_path / "missing.png")}}]}]}, 400, "invalid_image"),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}]}, 400, "invalid_audio"),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}]}]}, 400, None),
        (glm_server, {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]}]}, 400, "unsupported_media"),
        (tiny_server, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(media["image"])}}, {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": {"url": str(media["image"])}}]}]}, 400, "too_many_media"),
        (tiny_server, {"model": "tiny", "messages": [{"role": "system", "content": [
            {"type": "image_url", "image_url": {"url": str(media["image"])}}]}, *_user()]}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(), "temperature": -1}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(), "top_p": 0}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(), "max_tokens": 0}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(), "seed": "x"}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(), "stop": [1]}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(), "n": 2}, 400, None),
        (tiny_server, {"model": "tiny", "messages": _user(), "tools": [{"type": "function"}]}, 400, None),
        (tiny_server, [1, 2], 400, None),
    ]
    for server, body, status, code in cases:
        r = _post(server, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and (code is None or err["code"] == code), (body, err)
        assert "Traceback" not in r.text and 'File "' not in r.text
    r = _post(tiny_server, None, raw=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("the request body is not valid JSON")
    r = httpx.get(f"{tiny_server.url}/v1/nothing-here", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):  # and as the official client sees it
        tiny_server.client().chat.completions.create(model="gpt-4o", messages=_user())


# --- concurrency --------------------------------------------------------------------------------------


def test_full_queue_refuses_with_429_and_every_request_is_answered():
    """50 concurrent requests on a queue of 4: each one is answered (200) or refused (429), none hangs or is lost."""
    from exporter.pipeline import open_reference

    server = Server(open_reference("tiny"), queue_size=4)
    try:
        body = {"model": "tiny", "messages": _user(), "max_tokens": 16, "temperature": 0}

        def one(i: int) -> int:
            r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": i % 2 == 1}, timeout=60)
            if r.status_code == 200 and i % 2 == 1:
                assert r.text.rstrip().endswith("data: [DONE]")
            elif r.status_code == 200:
                assert r.json()["usage"]["completion_tokens"] == 16
            else:
                assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
            return r.status_code

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(one, range(50)))
        assert set(statuses) <= {200, 429}
        assert statuses.count(429) > 0 and statuses.count(200) >= 5  # the bound held, and work still got done
        stats = server.engine.stats
        assert stats["refused"] == statuses.count(429) and stats["completed"] == statuses.count(200)
    finally:
        server.stop()


def _wait_idle(engine) -> None:
    deadline = time.monotonic() + 10
    while (engine.busy or engine.jobs.qsize()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.busy


def _pace(engine, monkeypatch, seconds: float) -> None:
    """The engine's real runner, ``seconds`` per token: tiny decodes ~400 tok/s, so an answer of a few hundred
    tokens can end before a test's client has done what it is testing."""
    stream_tokens = engine.runner.stream

    def paced(*args, **kwargs):
        steps = stream_tokens(*args, **kwargs)
        try:
            while True:
                time.sleep(seconds)
                yield next(steps)
        except StopIteration as done:
            return done.value
        finally:
            steps.close()

    monkeypatch.setattr(engine.runner, "stream", paced)


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_disconnects_cancels_its_generation(tiny_server, stream, monkeypatch):
    engine = tiny_server.engine
    _wait_idle(engine)
    _pace(engine, monkeypatch, 0.01)  # the whole answer takes ~2.4 s on any machine
    before = dict(engine.stats)
    body = {"model": "tiny", "messages": _user(), "max_tokens": 240, "temperature": 0, "stream": stream}
    if stream:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{tiny_server.url}/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break  # the first token arrived: go away
    else:  # the client gives up waiting for the whole answer once the server is generating it and hangs up
        # (not a fixed read timeout: on a loaded machine that fired before the first token, CI run 14)
        host, port = tiny_server.url.split("//", 1)[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            payload = json.dumps(body).encode()
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(payload), payload))
            deadline = time.monotonic() + 30
            while engine.stats["generated_tokens"] == before["generated_tokens"] and time.monotonic() < deadline:
                time.sleep(0.005)
            assert engine.stats["generated_tokens"] > before["generated_tokens"], "the server never started generating"
    deadline = time.monotonic() + 10
    while engine.stats["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats["cancelled"] == before["cancelled"] + 1
    assert engine.stats["completed"] == before["completed"]
    _wait_idle(engine)
    generated = engine.stats["generated_tokens"] - before["generated_tokens"]
    # stopped mid-way: the whole answer runs to the context's end (235 tokens, no eos on tiny for this prompt);
    # the client left at the first token generated (non-stream) or received, i.e. within ~10-20 paced tokens
    assert 0 < generated < 120, generated
    # and the handler returned (nothing waits for ever), and the server goes on answering
    deadline = time.monotonic() + 10
    while engine.open_handlers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.open_handlers == 0
    r = tiny_server.client().chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_a_job_that_starts_mid_queued_poll_sees_its_gone_client_at_the_running_poll(monkeypatch):
    """The watcher's slow queued poll must not delay noticing a client that left once the worker took its job."""
    import asyncio

    import exporter.serve
    from exporter.serve import Job, _watch_disconnect

    monkeypatch.setattr(exporter.serve, "QUEUED_POLL_S", 30.0)  # a queued poll this slow would stall the test

    class Request:  # connected at the first ask, gone after
        asks = 0

        async def is_disconnected(self):
            self.asks += 1
            return self.asks > 1

    async def scenario():
        job = Job(request=None, loop=asyncio.get_running_loop())
        watcher = asyncio.create_task(_watch_disconnect(Request(), job))
        await asyncio.sleep(0.01)  # first ask done while queued
        job.started = True  # the worker takes it
        t0 = time.monotonic()
        await asyncio.wait_for(watcher, timeout=10)
        return job, time.monotonic() - t0

    job, waited = asyncio.run(scenario())
    assert job.cancelled.is_set() and job.cancelled_by_client
    assert waited < 2.0, waited  # ~DISCONNECT_POLL_S, not the 30 s queued poll


def test_a_client_that_leaves_while_queued_is_skipped_and_its_handler_returns(tiny_server, monkeypatch):
    import exporter.serve

    monkeypatch.setattr(exporter.serve, "QUEUED_POLL_S", 0.02)  # see the queued client leave well within one answer
    engine = tiny_server.engine
    _wait_idle(engine)
    # 240 tokens in ~4.8 s: unpaced, the first answer could end within the second client's 0.2 s wait, and the worker
    # then took the queued job before the test saw it cancelled (CI run 20)
    _pace(engine, monkeypatch, 0.02)
    before = dict(engine.stats)
    url = f"{tiny_server.url}/v1/chat/completions"
    long = {"model": "tiny", "messages": _user(), "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=long) as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # the first request now holds the worker
        with pytest.raises(httpx.ReadTimeout):  # the second waits in the queue; its client gives up
            httpx.post(url, json={**long, "stream": False}, timeout=httpx.Timeout(30, read=0.2))
        deadline = time.monotonic() + 5
        while not (engine.jobs.qsize() and engine.jobs.queue[0].cancelled.is_set()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.jobs.qsize() == 1 and engine.jobs.queue[0].cancelled.is_set()  # seen while still queued
        assert engine.stats["completed"] == before["completed"]  # the first one still runs: the second was never taken
    _wait_idle(engine)
    deadline = time.monotonic() + 10
    while engine.open_handlers and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats["cancelled"] == before["cancelled"] + 2  # the running one and the queued one
    assert engine.stats["completed"] == before["completed"]
    assert engine.open_handlers == 0


# --- an artifact, and the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ort_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-ort") / "tiny-ort-fp32"
    r = CliRunner().invoke(app, ["export", "--target", "ort", "--recipe", "fp32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow
def test_served_artifact_answers_equal_generate_artifact(ort_fp32):
    from exporter.serve import open_model

    tokens, text, _ = _generate("--artifact", str(ort_fp32), "--prompt", PROMPT, "--max-new-tokens", "12")
    server = Server(open_model(ort_fp32))
    try:
        r = server.client().chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=12,
                                                    extra_body={"return_token_ids": True})
        assert r.choices[0].model_extra["token_ids"] == tokens
        assert r.choices[0].message.content == text
        chunks = server.client().chat.completions.create(model="tiny", messages=_user(), temperature=0, max_tokens=12,
                                                         stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finally:
        server.stop()


def test_cli_serve_refuses_a_taken_port_and_bad_options_in_one_line():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        r = CliRunner().invoke(app, ["serve", "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["serve", "--queue-size", "0"])
    assert r.exit_code == 2 and "--queue-size 0" in r.output
    r = CliRunner().invoke(app, ["serve", "/nonexistent/artifact", "--port", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_cli_serve_runs_until_interrupted_and_shuts_down_cleanly():
    """The real command in its own process: it prints its URL, answers, and Ctrl-C (SIGINT) shuts it down
    gracefully with the CLI's Ctrl-C exit (130, "interrupted"; uvicorn re-raises the signal after shutdown)."""
    import signal
    import subprocess
    import sys

    # SIGINT as a terminal's Ctrl-C finds it: a test run started in the background by a non-interactive shell
    # (`cmd &`) hands its children SIGINT ignored, and then uvicorn shuts down on it but exits 0
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", "0", "--served-model-name", "autoglm-phone-9b"],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"serving 'autoglm-phone-9b' at (http://127\.0\.0\.1:\d+/v1)", line)
            if m:
                break
        assert m, "".join(lines)
        base = m.group(1)
        deadline = time.monotonic() + 30
        while True:
            try:
                models = httpx.get(f"{base}/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert [m["id"] for m in models["data"]] == ["autoglm-phone-9b"]
        client = openai.OpenAI(base_url=base, api_key="EMPTY", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="autoglm-phone-9b", messages=_user(), temperature=0, max_tokens=4)
        assert r.usage.completion_tokens == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        rest = proc.stderr.read()
        assert "Finished server process" in rest and rest.rstrip().endswith("interrupted"), rest
        assert "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
