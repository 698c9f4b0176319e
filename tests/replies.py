"""Chat replies through the real client (`Conversation` on a real draft and a real hub), what the
target alone says they must be, and the hub's processes as a test that kills them sees them."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import httpx

from specedge_cli.conversation import Conversation, Reply
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote.client import HubClient
from tests.test_lossless import plain_template

MAX_TOKENS = 40


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.5)


def ask_disturbed(
    url: str,
    draft: DraftEngine,
    prompt: str,
    disturb: Callable[[], None],
    temperature: float = 0.9,
    reconnect_s: float = 60,
) -> tuple[Reply, int]:
    """One chat turn through the real client whose second round of tokens first runs `disturb`
    (a process killed, say); the reply and how often the client reconnected for it (waiting up
    to `reconnect_s` for the hub to take its session again)."""
    rounds = {"n": 0}

    def on_tokens(tokens: list[int]) -> None:
        rounds["n"] += 1
        if rounds["n"] == 2:
            disturb()

    with HubClient(url) as client:
        chat = conversation(draft, client, temperature, reconnect_s)
        try:
            reply = chat.ask(prompt, on_tokens=on_tokens)
        finally:
            chat.close()
    assert rounds["n"] >= 2, "the reply ended before it could be disturbed"
    return reply, chat.reconnects


def expected(target_alone, draft: DraftEngine, reply: Reply, temperature: float) -> list[int]:
    stop = frozenset(draft.vocab.stop_token_ids())
    return target_alone.decode(reply.prompt_token_ids, MAX_TOKENS, stop, temperature=temperature, seed=7)


def conversation(draft: DraftEngine, client: HubClient, temperature: float, reconnect_s: float = 60) -> Conversation:
    settings = DecodeSettings(
        max_tokens=MAX_TOKENS, temperature=temperature, seed=7, draft_len=3, reconnect_s=reconnect_s
    )
    return Conversation(draft, client, plain_template(draft), settings)


def workers_of(url: str, token: str | None = None) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"{url}/v1/workers", headers=headers, timeout=30).json()["workers"]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
