"""`specedge serve` as its users reach it: the real openai SDK and `llm`, a real `specedge serve`
process, a real hub on loopback; every reply is compared with `specedge chat` and the target alone."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from specedge_cli.decoding import Conversation, DecodeSettings
from specedge_cli.drafting.chat_template import template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import resolve_model
from specedge_cli.remote.client import HubClient
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
        yield lambda settings: Conversation(engine, client, template_for(engine, resolved), settings)


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
    tokens = target_alone.decode(engine.tokenize(prompt, add_bos=True), 20, _stops(tiny))
    expected = engine.detokenize([t for t in tokens if t not in _stops(tiny)]).decode("utf-8", "replace")
    assert answer.choices[0].text == expected
    assert answer.object == "text_completion" and answer.usage.completion_tokens == len(tokens)
    streamed = client.completions.create(model=model_id, prompt=prompt, max_tokens=20, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    # The same prompt extended by its answer: the server holds that prefix already.
    again = client.completions.create(
        model=model_id, prompt=[engine.tokenize(prompt, add_bos=True) + tokens], max_tokens=4
    )
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_sampled_replies_follow_the_seed_like_the_target_alone(served, model_id, tiny, target_alone):
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)
    prompt_ids = engine.tokenize("the dog ran", add_bos=True)
    texts = [
        served.client()
        .completions.create(model=model_id, prompt=prompt_ids, max_tokens=16, temperature=0.9, seed=11)
        .choices[0]
        .text
        for _ in range(2)
    ]
    tokens = target_alone.decode(prompt_ids, 16, _stops(tiny), temperature=0.9, seed=11)
    expected = engine.detokenize([t for t in tokens if t not in _stops(tiny)]).decode("utf-8", "replace")
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


def _ask(served, model_id: str, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return (
        served.client()
        .chat.completions.create(model=model_id, messages=messages, max_tokens=16)
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
    return frozenset(DraftEngine(path, n_ctx=1024, n_threads=1).stop_token_ids())


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
