"""`specedge serve` as its users reach it: the real openai SDK and `llm`, a real `specedge serve`
process, a real hub on loopback; every reply is compared with `specedge chat` and the target alone."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import BUILTIN_TEMPLATES, ChatTemplate, template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import HubRejected
from specedge_cli.models import resolve_model
from specedge_cli.remote.client import HubClient
from specedge_cli.serve.layout import take_up_exchanges
from specedge_common.net import free_port
from tests.conftest import REPO, RunningHub, run_specedge

API_KEY = "test-key-4c1d"
PROMPT = "the dog ran"


class Served:
    """`specedge serve` in a child process, on a free loopback port."""

    def __init__(self, draft: Path, hub_url: str, home: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / f"serve-{self.port}.log"
        home.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "specedge_cli", "serve", "--port", str(self.port), "--hub", hub_url]
        self.process = subprocess.Popen(
            [*command, "--model", str(draft), "--threads", "2", *extra],
            cwd=REPO,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "SPECEDGE_HOME": str(home), **(env or {})},
        )
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text())
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(self.log.read_text())

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tiny, hub, tmp_path_factory):
    running = Served(
        tiny.gguf_q8, hub.url, tmp_path_factory.mktemp("serve-home"), "--parallel", "2", "--api-key", API_KEY
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def model_id(served) -> str:
    return served.client().models.list().data[0].id


@pytest.fixture(scope="module")
def reference(tiny, hub):
    """A conversation in this process on the same hub and draft: what `specedge chat` does, turn by turn."""
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2)
    resolved = resolve_model(str(tiny.gguf_q8), Path("unused"))
    with HubClient(hub.url) as client:
        yield lambda settings: Conversation(engine, client, template_for(engine.vocab, resolved), settings)


def chat_json(tiny, hub, prompt: str, max_tokens: int, *extra: str) -> dict:
    result = run_specedge(
        "chat", "--json", "-p", prompt, "--hub", hub.url, "--model", str(tiny.gguf_q8), "--max-tokens", str(max_tokens),
        *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_models_lists_the_hubs_target(served, hub):
    models = served.client().models.list().data
    assert [m.id for m in models] == [httpx.get(f"{hub.url}/v1/info").json()["model"]]
    assert served.client().models.retrieve(models[0].id).owned_by == "specedge"


def test_chat_equals_specedge_chat_and_the_target_alone(served, model_id, tiny, hub, target_alone):
    expected = chat_json(tiny, hub, PROMPT, 24, "--temperature", "0")
    answer = served.client().chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.content == expected["text"]
    assert answer.choices[0].message.role == "assistant"
    assert expected["token_ids"] == target_alone.decode(expected["prompt_token_ids"], 24, _stops(tiny))
    assert answer.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert answer.usage.completion_tokens == len(expected["token_ids"])
    ended_by_stop = expected["token_ids"][-1] in _stops(tiny)
    assert answer.choices[0].finish_reason == ("stop" if ended_by_stop else "length")


def test_streamed_chat_equals_the_answer_and_ends_with_usage(served, model_id):
    client = served.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "once upon a time"}]
    whole = client.chat.completions.create(model=model_id, messages=messages, max_completion_tokens=30, seed=3)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=messages,
            max_completion_tokens=30,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_conversation_continued_reuses_its_hub_session(served, model_id, reference, target_alone, tiny):
    client = served.client()
    settings = DecodeSettings(max_tokens=20)
    first_prompt, second_prompt = "the cat sat on", "and then"
    messages = [{"role": "user", "content": first_prompt}]
    first = client.chat.completions.create(model=model_id, messages=messages, max_tokens=20)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}]
    messages += [{"role": "user", "content": second_prompt}]
    second = client.chat.completions.create(model=model_id, messages=messages, max_tokens=20)
    # The hub held the first turn (prompt and reply): only the new turn's tokens travelled.
    held = first.usage.prompt_tokens + first.usage.completion_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == held
    conversation = reference(settings)
    one, two = conversation.ask(first_prompt), conversation.ask(second_prompt)
    conversation.close()
    assert [first.choices[0].message.content, second.choices[0].message.content] == [one.text, two.text]
    assert second.usage.prompt_tokens == held + len(two.prompt_token_ids)
    before = one.prompt_token_ids + one.token_ids + two.prompt_token_ids
    assert two.token_ids == target_alone.decode(before, 20, _stops(tiny))


def test_a_conversation_sent_whole_to_a_fresh_server_is_rebuilt_from_its_text(served, model_id, reference):
    client = served.client()
    messages = [
        {"role": "user", "content": "numbers: one two"},
        {"role": "assistant", "content": " three four"},
        {"role": "user", "content": "five"},
    ]
    answer = client.chat.completions.create(model=model_id, messages=messages, max_tokens=16)
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    conversation = reference(DecodeSettings(max_tokens=16))
    conversation.add_exchange("numbers: one two", " three four")
    expected = conversation.ask("five")
    conversation.close()
    assert answer.choices[0].message.content == expected.text


def test_completions_continue_the_prompt_as_the_target_alone(served, model_id, tiny, target_alone):
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)
    client = served.client()
    prompt = "once upon a time there was"
    answer = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0)
    tokens = target_alone.decode(engine.vocab.tokenize(prompt, add_bos=True), 20, _stops(tiny))
    expected = engine.vocab.detokenize([t for t in tokens if t not in _stops(tiny)]).decode("utf-8", "replace")
    assert answer.choices[0].text == expected
    assert answer.object == "text_completion" and answer.usage.completion_tokens == len(tokens)
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    # The same prompt extended by its answer: the server holds that prefix already.
    again = client.completions.create(
        model=model_id, prompt=[engine.vocab.tokenize(prompt, add_bos=True) + tokens], max_tokens=4
    )
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_sampled_replies_follow_the_seed_like_the_target_alone(served, model_id, tiny, target_alone):
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)
    prompt_ids = engine.vocab.tokenize("the dog ran", add_bos=True)
    texts = [
        served.client()
        .completions.create(model=model_id, prompt=prompt_ids, max_tokens=16, temperature=0.9, seed=11)
        .choices[0]
        .text
        for _ in range(2)
    ]
    tokens = target_alone.decode(prompt_ids, 16, _stops(tiny), temperature=0.9, seed=11)
    expected = engine.vocab.detokenize([t for t in tokens if t not in _stops(tiny)]).decode("utf-8", "replace")
    assert texts == [expected, expected]


def test_a_stop_sequence_cuts_the_reply_before_it(served, model_id):
    client = served.client()
    messages = [{"role": "user", "content": "numbers: one two three"}]
    full = client.chat.completions.create(model=model_id, messages=messages, max_tokens=30).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        answer = client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=30, stop=[stop, "\x00never"], stream=stream
        )
        if stream:
            chunks = list(answer)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


def test_requests_at_once_are_served_and_equal_their_answers_alone(served, model_id):
    prompts = ["the cat sat on", "once upon a time", "numbers: one two", "the dog ran"]
    alone = {p: _ask(served, model_id, p) for p in prompts}
    together: dict[str, str] = {}
    threads = [threading.Thread(target=lambda p=p: together.__setitem__(p, _ask(served, model_id, p))) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone


def _ask(served, model_id: str, prompt: str, max_tokens: int = 16) -> str:
    messages = [{"role": "user", "content": prompt}]
    return (
        served.client()
        .chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens)
        .choices[0]
        .message.content
    )


def test_errors_come_in_openais_shape(served, model_id):
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        served.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        served.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found" and model_id in missing.value.message
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        served.client().chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="last message must come from the user"):
        turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        served.client().chat.completions.create(model=model_id, messages=turns)
    with pytest.raises(openai.BadRequestError, match="'temperature' must be between 0 and 2"):
        served.client().chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "hi"}], temperature=5
        )
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(f"{served.url}/v1/chat/completions", content=b"{nope", headers=headers)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}
    nowhere = httpx.get(f"{served.url}/v1/embeddings", headers=headers)
    assert nowhere.status_code == 404 and nowhere.json()["error"]["type"] == "invalid_request_error"


def test_llm_talks_to_it_as_an_openai_compatible_model(served, model_id, tmp_path):
    user_dir = tmp_path / "llm"
    user_dir.mkdir()
    (user_dir / "extra-openai-models.yaml").write_text(
        f"- model_id: specedge-tiny\n  model_name: {model_id}\n  api_base: {served.url}/v1\n  api_key_name: specedge\n"
    )
    (user_dir / "keys.json").write_text(json.dumps({"specedge": API_KEY}))
    env = {**os.environ, "LLM_USER_PATH": str(user_dir)}
    expected = _ask(served, model_id, "the cat sat on")
    for streaming in ([], ["--no-stream"]):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "llm",
                "-m",
                "specedge-tiny",
                "-o",
                "max_tokens",
                "16",
                *streaming,
                "the cat sat on",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip("\n") == expected.rstrip("\n")


def test_a_host_beyond_loopback_needs_an_api_key(tiny, hub):
    result = run_specedge("serve", "--host", "0.0.0.0", "--hub", hub.url, "--model", str(tiny.gguf_q8))
    assert result.returncode == 1 and "without --api-key" in result.stderr


def _stops(tiny) -> frozenset[int]:
    return _stop_ids(tiny.gguf_q8)


@functools.cache
def _stop_ids(path: Path) -> frozenset[int]:
    return frozenset(DraftEngine(path, n_ctx=1024, n_threads=1).vocab.stop_token_ids())


def test_a_hub_lost_mid_stream_ends_the_stream_with_an_error(tiny, tmp_path):
    own_hub = RunningHub(tiny.hf_dir, tmp_path / "hub", "--max-draft-tokens", "4")
    try:
        # One token drafted per verify: the reply takes many rounds, so the hub dies in the middle.
        env = {"SPECEDGE_RECONNECT_S": "1", "SPECEDGE_DRAFT_LEN": "1"}
        server = Served(tiny.gguf_q8, own_hub.url, tmp_path / "home", env=env)
    except BaseException:
        own_hub.stop()
        raise
    try:
        client = server.client()
        stream = client.chat.completions.create(
            model="specedge", messages=[{"role": "user", "content": "once upon a time"}], max_tokens=400, stream=True
        )
        with pytest.raises(openai.APIError, match="did not come back"):
            for index, _chunk in enumerate(stream):
                if index == 1:
                    own_hub.process.kill()
                    own_hub.process.wait()
        # The server itself is fine: it answers, and says why a request cannot be decoded now.
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        server.stop()
        own_hub.stop()


# --- the HTTP server: keep-alive, timeouts, limits, malformed requests ------------------------------
Answer = tuple[int, dict[str, str], bytes]  # status, headers, body


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _read_answer(stream) -> Answer:
    """One HTTP/1.1 answer with a Content-Length body, read from the connection's byte stream."""
    status_line = stream.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, stream.read(int(headers["content-length"]))


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection, which must happen within `seconds`."""
    sock.settimeout(seconds)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _openai_error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    return error


def _post(path: str, body: bytes, key: str = API_KEY) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


def test_a_refused_request_and_the_next_on_one_connection_are_answered_as_two(served):
    # The refused request's body is itself a request: a server that answered without reading the
    # body would take it for the next one (three answers, or a 400 for the leftover bytes).
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n"
    good = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() + b"\r\n\r\n"
    with _connect(served.url) as sock, sock.makefile("rb") as stream:
        sock.sendall(_post("/v1/chat/completions", hidden, key="wrong") + good)  # pipelined
        unauthorized, models = _read_answer(stream), _read_answer(stream)
        assert unauthorized[0] == 401 and _openai_error(unauthorized[2])["code"] == "invalid_api_key"
        assert models[0] == 200 and json.loads(models[2])["object"] == "list"
        sock.sendall(_post("/v1/nowhere", hidden))  # then a 404 and, after its answer, a good request
        assert _read_answer(stream)[0] == 404
        sock.sendall(good)
        assert _read_answer(stream)[0] == 200
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # no third answer: the bodies were read as bodies


def test_the_openai_sdk_goes_on_on_its_pooled_connection_after_an_error(served, model_id):
    refused = served.client(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        refused.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])
    client = refused.with_options(api_key=API_KEY)  # the same httpx client, so the same pool
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=model_id, input="hi")  # a route this server does not offer
    answer = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.role == "assistant"
    ports = _client_ports(served, ['"POST /v1/chat/completions HTTP/1.1" 401', '"POST /v1/embeddings HTTP/1.1" 404'])
    ports += _client_ports(served, ['"POST /v1/chat/completions HTTP/1.1" 200'])[-1:]
    assert len(ports) == 3 and len(set(ports)) == 1, ports  # three answers, one connection


def _client_ports(served, request_lines: list[str]) -> list[int]:
    """The client ports of the access log's last lines for these requests, in order."""
    lines = served.log.read_text().splitlines()
    ports = []
    for request_line in request_lines:
        last = [line for line in lines if request_line in line][-1]
        ports.append(int(re.search(r":(\d+) - \"", last).group(1)))
    return ports


@pytest.fixture(scope="module")
def guarded(tiny, hub, tmp_path_factory):
    """A server with short connection limits, to see them act."""
    running = Served(
        tiny.gguf_q8, hub.url, tmp_path_factory.mktemp("guarded-home"),
        "--api-key", API_KEY, "--idle-timeout", "1", "--request-timeout", "1", "--max-connections", "6",
    )  # fmt: skip
    yield running
    running.stop()


def test_idle_and_trickling_connections_are_closed(guarded):
    silent, kept, trickling = _connect(guarded.url), _connect(guarded.url), _connect(guarded.url)
    with silent, kept, trickling, kept.makefile("rb") as stream:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_answer(stream)[0] == 200
        trickling.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the server may close while the client still trickles
            for _ in range(3):
                time.sleep(0.4)
                trickling.sendall(b"X-Slow: 1\r\n")
        assert b"408 Request Timeout" in _closed_within(trickling, 3)
        answered = _closed_within(silent, 3)
        assert answered.startswith(b"HTTP/1.1 408") and b'"code": "request_timeout"' in answered
        assert _closed_within(kept, 3) == b""  # kept alive, then closed when idle
        assert time.monotonic() - started < 3


def test_connections_past_the_cap_are_refused_at_once(guarded):
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(_connect(guarded.url)) for _ in range(6)]
        with _connect(guarded.url) as extra:
            answered = _closed_within(extra, 1)
        assert answered.startswith(b"HTTP/1.1 503") and b'"code": "server_busy"' in answered
        held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # those already open are served
        with held[0].makefile("rb") as stream:
            assert _read_answer(stream)[0] == 200


def _chat_body(model_id: str, **fields) -> bytes:
    return json.dumps({"model": model_id, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


@pytest.mark.parametrize(
    "case",
    ["bad content-length", "NaN", "nested 100,000 deep", "seed 2**63", "not JSON", "not UTF-8", "huge header",
     "body over the limit"],
)  # fmt: skip
def test_malformed_requests_are_refused_in_openais_shape_within_a_second(served, model_id, case):
    requests = {
        "bad content-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n",
        "NaN": _post("/v1/chat/completions", _chat_body(model_id, temperature=float("nan"))),
        "nested 100,000 deep": _post("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
        "seed 2**63": _post("/v1/chat/completions", _chat_body(model_id, seed=2**63)),
        "not JSON": _post("/v1/completions", b"model=tiny&prompt=hi"),
        "not UTF-8": _post("/v1/completions", b'{"model": "\xff\xfe"}'),
        "huge header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        "body over the limit": _post("/v1/completions", b"")[:-4].replace(b"Length: 0", b"Length: 17000000")
        + b"\r\n\r\n",
    }
    started = time.monotonic()
    with _connect(served.url) as sock, sock.makefile("rb") as stream:
        sock.sendall(requests[case])
        status, headers, body = _read_answer(stream)
    assert time.monotonic() - started < 1
    assert 400 <= status < 500 and headers["content-type"] == "application/json"
    error = _openai_error(body)
    expected = {"seed 2**63": (400, "seed"), "huge header": (431, None), "body over the limit": (413, None)}
    if case in expected:
        assert (status, error["param"]) == expected[case], error
    assert "internal" not in error["message"]


def test_a_long_history_costs_linear_time_and_past_the_cap_a_clear_refusal(served, model_id):
    # Sent as one JSON body: the openai SDK itself takes ~15 s to serialize 40,000 messages.
    exchanges = [{"role": role, "content": f"{role} {i}"} for i in range(20_000) for role in ("user", "assistant")]
    started = time.monotonic()
    over = _chat(served, model_id, [*exchanges, {"role": "user", "content": "and now?"}])
    elapsed = time.monotonic() - started
    # Every message was laid out and counted: the history's tokens are named, far past the context.
    assert over.status_code == 400 and _openai_error(over.content)["code"] == "context_length_exceeded"
    counted = int(re.search(r"resulted in (\d+) tokens", over.json()["error"]["message"]).group(1))
    assert counted > 40_000 and elapsed < 10, (counted, elapsed)  # 2,000 exchanges took 9.3 s when quadratic
    started = time.monotonic()
    capped = _chat(served, model_id, [*exchanges, *exchanges, {"role": "user", "content": "and now?"}])
    assert time.monotonic() - started < 2
    error = _openai_error(capped.content)
    assert capped.status_code == 400 and error["code"] == "too_many_messages" and "80,001" in error["message"]


def _chat(served, model_id: str, messages: list[dict]) -> httpx.Response:
    body = json.dumps({"model": model_id, "messages": messages, "max_tokens": 4})
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    return httpx.post(f"{served.url}/v1/chat/completions", content=body, headers=headers, timeout=60)


def test_a_prompt_over_the_context_is_refused_before_any_work(served, model_id, hub):
    limit = httpx.get(f"{hub.url}/v1/info").json()["max_context"]
    client = served.client()
    for stream in (False, True):
        started = time.monotonic()
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=model_id, prompt=[5] * 4000, max_tokens=8, stream=stream)
        assert time.monotonic() - started < 1
        assert refused.value.code == "context_length_exceeded" and refused.value.param == "prompt"
        assert f"maximum context length is {limit} tokens" in refused.value.message
        assert "resulted in 4000 tokens" in refused.value.message
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError, match=f"is {limit} tokens.*reduce the length of the messages"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "the dog ran " * 1500}])
    assert time.monotonic() - started < 1


def test_a_chat_prompt_over_the_context_is_refused_before_drafting(reference, hub):
    # `specedge chat`'s side (the decoder both share): refused at once, the conversation going on.
    limit = httpx.get(f"{hub.url}/v1/info").json()["max_context"]
    conversation = reference(DecodeSettings(max_tokens=8))
    conversation.ask("the cat sat on")
    session = conversation.session_id
    started = time.monotonic()
    with pytest.raises(HubRejected) as refused:
        conversation.ask("the dog ran " * 1500)
    assert time.monotonic() - started < 1
    assert refused.value.code == "context_too_long" and f"model's context of {limit} tokens" in refused.value.message
    conversation.ask("and then")
    assert conversation.session_id == session and [t.prompt for t in conversation.turns] == [
        "the cat sat on",
        "and then",
    ]
    conversation.close()


def test_a_reply_cut_by_the_context_keeps_its_text_and_says_length(served, model_id, hub, tiny, target_alone):
    limit = httpx.get(f"{hub.url}/v1/info").json()["max_context"]
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)
    base = engine.vocab.tokenize("once upon a time there was a dog. ", add_bos=True)
    prompt = (base * limit)[: limit - 12]  # room for 12 tokens
    expected_ids = target_alone.decode(prompt, 12, _stops(tiny))
    assert len(expected_ids) == 12 and not set(expected_ids) & _stops(tiny)  # the context, not a stop, ends it
    expected = engine.vocab.detokenize(expected_ids).decode("utf-8", "replace")
    client = served.client()
    answer = client.completions.create(model=model_id, prompt=prompt, max_tokens=100, temperature=0)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "length")
    assert answer.usage.completion_tokens == 12
    chunks = list(client.completions.create(model=model_id, prompt=prompt, max_tokens=100, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_streamed_chat_reply_cut_by_the_context_says_length(served, model_id, hub, tiny, target_alone):
    limit = httpx.get(f"{hub.url}/v1/info").json()["max_context"]
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)
    sentence, count = "once upon a time there was a dog. ", 1
    while len(engine.vocab.tokenize(sentence * (count + 1), add_bos=True)) <= limit - 10:
        count += 1
    prompt_ids = engine.vocab.tokenize(sentence * count, add_bos=True)  # the tiny model's template: the text as it is
    room = limit - len(prompt_ids)
    expected_ids = target_alone.decode(prompt_ids, room, _stops(tiny))
    assert len(expected_ids) == room and not set(expected_ids) & _stops(tiny)
    chunks = list(
        served.client().chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": sentence * count}],
            max_tokens=500,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == engine.vocab.detokenize(expected_ids).decode("utf-8", "replace")
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == room


def test_health_answers_at_once_while_requests_decode(served, model_id):
    # Decoding (tokenizing, drafting, waiting for the hub) runs on threads, never on the event loop.
    prompts = ["once upon a time", "the cat sat on", "numbers: one two", "the dog ran", "and then"]
    threads = [threading.Thread(target=_ask, args=(served, model_id, p, 96)) for p in prompts]
    for thread in threads:
        thread.start()
    checked_while_busy = 0
    while any(thread.is_alive() for thread in threads):
        started = time.monotonic()
        assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1
        checked_while_busy += any(thread.is_alive() for thread in threads)
        time.sleep(0.05)
    assert checked_while_busy >= 3


# A template whose generation prompt is not the assistant's header (as DeepSeek-R1's): the layout at
# once cannot be used, and the per-turn one is.
THINKING_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<U>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<A>{{ m.content }}</A>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<A><think>{% endif %}"
)


@pytest.mark.parametrize("template_name", ["the model's own", "gemma", "thinking"])
def test_a_history_laid_out_at_once_equals_it_laid_out_turn_by_turn(tiny, hub, template_name):
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)
    template = {
        "the model's own": template_for(engine.vocab, resolve_model(str(tiny.gguf_q8), Path("unused"))),
        "gemma": ChatTemplate(BUILTIN_TEMPLATES["gemma"], "<s>", ""),
        "thinking": ChatTemplate(THINKING_TEMPLATE, "<s>", ""),
    }[template_name]
    exchanges = [("numbers: one two", " three four"), ("the cat sat on", " the mat</s>"), ("and", "")] * 3
    with HubClient(hub.url) as client:
        one_by_one, at_once, partly = (
            Conversation(engine, client, template, DecodeSettings(), system="be brief") for _ in range(3)
        )
        for user, reply in exchanges:
            one_by_one.add_exchange(user, reply)
        expected = one_by_one._turn_tokens("and now?")
        assert take_up_exchanges(at_once, exchanges, "and now?") == expected
        for user, reply in exchanges[:4]:  # a slot already holding the first turns takes up the rest
            partly.add_exchange(user, reply)
        assert take_up_exchanges(partly, exchanges[4:], "and now?") == expected
    for conversation in (at_once, partly):
        assert conversation.history == one_by_one.history
        assert [t.prompt_token_ids for t in conversation.turns] == [t.prompt_token_ids for t in one_by_one.turns]
