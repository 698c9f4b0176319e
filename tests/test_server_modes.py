"""Server-only modes (the baselines, and service for users without a GPU) and /metrics."""

from __future__ import annotations

import pytest

from specedge_bench.metrics import MetricsPage
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import HubRejected
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from specedge_common import metric_names as names
from specedge_common.grammar import json_schema_grammar
from tests.conftest import RunningHub
from tests.test_grammar import PAINT, target_under_grammar

PROMPT = [1, 261, 412, 425, 281, 300]


@pytest.fixture(scope="module")
def hub_with_draft(tiny, tmp_path_factory):
    running = RunningHub(tiny.hf_dir, tmp_path_factory.mktemp("hub-draft"), "--draft", str(tiny.gguf_q8))
    yield running
    running.stop()


def open_session(client: HubClient, temperature: float = 0.0, seed: int = 0) -> str:
    info = client.info()
    return client.open_session(
        wire.OpenSessionRequest(
            vocab_size=info.vocab_size,
            vocab_fingerprint=info.vocab_fingerprint,
            sampling=wire.Sampling(temperature=temperature, seed=seed),
        )
    ).session_id


def generate(client: HubClient, mode: str, max_tokens: int, **sampling) -> tuple[list[int], wire.GenerateChunk]:
    session = open_session(client, **sampling)
    chunks = list(
        client.generate(session, wire.GenerateRequest(mode=mode, tokens=PROMPT, max_tokens=max_tokens, draft_len=4))
    )
    client.close_session(session)
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    return [t for c in chunks for t in c.tokens], chunks[-1]


@pytest.mark.parametrize("mode", ["autoregressive", "speculative"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_server_only_modes_follow_a_sessions_grammar(hub_with_draft, target_alone, tiny, mode, temperature):
    """The hub's own decoding draws under the session's grammar as a client's verifies do."""
    engine = DraftEngine(tiny.gguf_q8, n_ctx=256, n_threads=1)
    grammar = json_schema_grammar(PAINT)
    with HubClient(hub_with_draft.url) as client:
        info = client.info()
        session = client.open_session(
            wire.OpenSessionRequest(
                vocab_size=info.vocab_size,
                vocab_fingerprint=info.vocab_fingerprint,
                sampling=wire.Sampling(temperature=temperature, seed=3),
                stop_token_ids=engine.vocab.stop_token_ids(),
                constraint=wire.Constraint(grammar, start=len(PROMPT)),
            )
        ).session_id
        request = wire.GenerateRequest(mode=mode, tokens=PROMPT, max_tokens=40, draft_len=4)
        tokens = [t for chunk in client.generate(session, request) for t in chunk.tokens]
        client.close_session(session)
    assert tokens == target_under_grammar(target_alone, engine, PROMPT, grammar, 40, temperature, 3)


@pytest.mark.parametrize("mode", ["autoregressive", "speculative"])
def test_server_only_modes_equal_target_alone(hub_with_draft, target_alone, mode):
    with HubClient(hub_with_draft.url) as client:
        tokens, last = generate(client, mode, 25)
        assert tokens == target_alone.decode(PROMPT, 25)
        assert last.context_len == len(PROMPT) + 25
        if mode == "autoregressive":
            assert last.verifies == 25
        else:
            assert last.verifies < 25  # the hub's draft saved forward passes
        sampled, _ = generate(client, mode, 20, temperature=0.8, seed=3)
        assert sampled == target_alone.decode(PROMPT, 20, temperature=0.8, seed=3)


def test_speculative_mode_without_a_draft_is_refused(hub):
    with HubClient(hub.url) as client:
        session = open_session(client)
        with pytest.raises(HubRejected, match="--draft"):
            list(client.generate(session, wire.GenerateRequest(mode="speculative", tokens=PROMPT)))
        assert "speculative" not in client.info().modes


def test_metrics_report_sessions_batches_and_tokens_by_mode(hub_with_draft):
    with HubClient(hub_with_draft.url) as client:
        generate(client, "autoregressive", 5)
        page = MetricsPage.parse(client.metrics())
    for name in (
        names.ACTIVE_SESSIONS,
        names.QUEUE_DEPTH,
        names.KV_BYTES,
        names.BATCH_SIZE_LAST,
        names.VERIFY_REQUESTS,
        names.TOKENS_PER_VERIFY,
        names.DEVICE_BUSY_SECONDS,
    ):
        assert page.has(name), name
    assert page.value(names.EMITTED_TOKENS, mode="autoregressive") >= 5
    # The verify passes read the KV pool in place: nothing of any session's past was copied.
    assert page.has(names.PAST_KV_BYTES_COPIED) and page.value(names.PAST_KV_BYTES_COPIED) == 0
