"""KV memory running out on a real hub on loopback: sessions decoding through real clients need
more blocks than the pool holds, so the hub evicts the session that idles (its client rebuilds it
from its own history at its next turn), and every reply equals the target decoding alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from hub_server.retirement import MEMORY_IDLE_FLOOR_S
from specedge_bench.metrics import MetricsPage
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote.client import HubClient
from tests.conftest import ATTENTION, RunningHub
from tests.test_lossless import plain_template

BLOCK_BYTES = 16 * 2 * 2 * 16 * 4 * 2  # 16 tokens x keys and values x 2 kv heads x 16 dims x fp32 x 2 layers
POOL_BLOCKS = 31  # 30 blocks of 16 tokens to hand out (block 0 is never handed out): 480 tokens
READER = "a long story about a cat that sat on the mat and looked at the birds in the garden, " * 3
DECODERS = (
    "once upon a time there was a fox in the woods who wanted to find the river, " * 2,
    "numbers: one two three four five six seven eight nine ten eleven twelve, " * 2,
)


@pytest.fixture(scope="module")
def tight_hub(tiny, tmp_path_factory):
    """The tiny target with a pool of 30 blocks, a session limit of 256 tokens (a pass's widest
    row, a 128-token prompt chunk, must fit beside one session), drafts of up to 16 tokens."""
    running = RunningHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("tight-hub"),
        *("--kv-memory-gib", f"{POOL_BLOCKS * BLOCK_BYTES / (1 << 30):.9f}", "--max-context", "256"),
        *("--max-draft-tokens", "16", "--attention", ATTENTION),
    )
    yield running
    running.stop()


def test_an_idle_session_gives_its_blocks_to_decoding_ones_and_is_rebuilt_losslessly(tiny, tight_hub, target_alone):
    """The reader's session holds about a third of the 30 blocks and idles; two sessions then
    decode 80 tokens each at once (a chain and a tree, with a draft that is sometimes wrong),
    which needs more blocks than are left: one of their verifies evicts the reader's session, and
    neither is refused. The reader's next turn finds its session gone and its client rebuilds it.
    Every reply is the target's own."""
    settings = {
        "reader": DecodeSettings(max_tokens=40, temperature=0.0, draft_len=6),
        DECODERS[0]: DecodeSettings(max_tokens=80, temperature=0.0, draft_len=6),
        DECODERS[1]: DecodeSettings(max_tokens=80, temperature=0.0, tree_budget=12, tree_width=3),
    }
    engines = {name: DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1) for name in settings}
    stop = frozenset(engines["reader"].vocab.stop_token_ids())
    turns: list[tuple[str, list[int], list[int], list[int]]] = []  # who, history before, prompt, reply

    def turn(name: str, conversation: Conversation, prompt: str) -> None:
        history = list(conversation.history)
        reply = conversation.ask(prompt)
        turns.append((name, history, reply.prompt_token_ids, reply.token_ids))

    def conversation(name: str) -> Conversation:
        return Conversation(engines[name], HubClient(tight_hub.url), plain_template(engines[name]), settings[name])

    def decode(name: str, started: threading.Barrier) -> Conversation:
        chat = conversation(name)
        started.wait()
        turn(name, chat, name)
        return chat

    reader = conversation("reader")
    turn("reader", reader, READER)
    reader_blocks = -(-len(reader.history) // 16)
    time.sleep(MEMORY_IDLE_FLOOR_S + 0.5)  # idle long enough to give its memory up
    started = threading.Barrier(len(DECODERS))
    with ThreadPoolExecutor(len(DECODERS)) as pool:
        decoders = [chat.result(timeout=300) for chat in [pool.submit(decode, name, started) for name in DECODERS]]
    decoder_blocks = sum(-(-len(chat.history) // 16) for chat in decoders)
    assert reader_blocks + decoder_blocks > POOL_BLOCKS - 1 >= decoder_blocks + 2  # only with the reader's
    assert [chat.reconnects for chat in decoders] == [0, 0]  # neither evicted nor refused
    page = MetricsPage.parse(httpx.get(f"{tight_hub.url}/metrics", timeout=30).text)
    assert page.value("specedge_evicted_for_memory_total") == 1
    assert page.value("specedge_evicted_sessions_total") == 1  # the idle sweep (600 s) took nobody
    for chat in decoders:
        chat.close()

    turn("reader", reader, "and then what did the cat do")
    assert reader.reconnects == 1  # its session was gone: reopened and fed its history
    reader.close()
    for name, history, prompt, reply in turns:
        assert reply == target_alone.decode(history + prompt, settings[name].max_tokens, stop), name


@pytest.fixture(scope="module")
def full_hub(tiny, tmp_path_factory):
    """The tiny target with 24 blocks to hand out: either decoder's reply fits, both at once do not."""
    running = RunningHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("full-hub"),
        *("--kv-memory-gib", f"{FULL_POOL_BLOCKS * BLOCK_BYTES / (1 << 30):.9f}", "--max-context", "256"),
        *("--max-draft-tokens", "16", "--attention", ATTENTION),
    )
    yield running
    running.stop()


FULL_POOL_BLOCKS = 25  # the least a hub of 256-token sessions starts with: one session and a 128-token pass


def test_a_reply_that_finds_the_memory_full_waits_and_goes_on_losslessly(tiny, full_hub, target_alone):
    """Two sessions decode at once and both grow until the pool holds no free block and neither
    has idled: the hub refuses a growing verify 503 `kv_memory_full` with nothing taken, and its
    client waits the Retry-After out with its session kept, until the other session has idled long
    enough to give its blocks up (its reply ended, or it waits too: then it is evicted, and its
    client rebuilds it once memory frees). Both replies complete, equal to the target's own."""
    settings = DecodeSettings(max_tokens=150, temperature=0.0, draft_len=6)  # within the 256-token context
    engines = [DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1) for _ in DECODERS]
    stop = frozenset(engines[0].vocab.stop_token_ids())
    started = threading.Barrier(len(DECODERS))

    def decode(index: int) -> tuple[Conversation, list[int], list[int]]:
        chat = Conversation(engines[index], HubClient(full_hub.url), plain_template(engines[index]), settings)
        started.wait()
        reply = chat.ask(DECODERS[index])
        return chat, reply.prompt_token_ids, reply.token_ids

    with ThreadPoolExecutor(len(DECODERS)) as pool:
        finished = [future.result(timeout=300) for future in [pool.submit(decode, i) for i in range(len(DECODERS))]]
    blocks = [-(-len(chat.history) // 16) for chat, _, _ in finished]
    assert sum(blocks) > FULL_POOL_BLOCKS - 1 >= max(blocks)  # either alone fits, both do not
    assert sum(chat.session.memory_waits for chat, _, _ in finished) >= 1
    assert sum(chat.reconnects for chat, _, _ in finished) <= 1  # at most the one evicted
    page = MetricsPage.parse(httpx.get(f"{full_hub.url}/metrics", timeout=30).text)
    assert page.value("specedge_evicted_for_memory_total") >= 1  # who waited longest gave its blocks up
    for chat, prompt, reply in finished:
        assert reply == target_alone.decode(prompt, settings.max_tokens, stop)
        chat.close()
