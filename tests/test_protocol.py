"""The client's and the hub's copies of the wire format agree, field for field."""

from dataclasses import fields

import pytest

from hub_server import protocol as hub_wire
from specedge_cli.remote import protocol as client_wire

PAIRS = [
    (client_wire.Sampling, hub_wire.Sampling),
    (client_wire.OpenSessionRequest, hub_wire.OpenSessionRequest),
    (client_wire.OpenSessionResponse, hub_wire.OpenSessionResponse),
    (client_wire.FeedRequest, hub_wire.FeedRequest),
    (client_wire.FeedResponse, hub_wire.FeedResponse),
    (client_wire.VerifyRequest, hub_wire.VerifyRequest),
    (client_wire.VerifyResponse, hub_wire.VerifyResponse),
    (client_wire.HubInfo, hub_wire.HubInfo),
    (client_wire.DraftHint, hub_wire.DraftHint),
    (client_wire.GenerateRequest, hub_wire.GenerateRequest),
    (client_wire.GenerateChunk, hub_wire.GenerateChunk),
    (client_wire.UserLimits, hub_wire.UserLimits),
    (client_wire.WhoAmIResponse, hub_wire.WhoAmIResponse),
    (client_wire.Constraint, hub_wire.Constraint),
    (client_wire.TokenLogprobs, hub_wire.TokenLogprobs),
]


def test_versions_agree():
    assert client_wire.PROTOCOL_VERSION == hub_wire.PROTOCOL_VERSION
    assert client_wire.GRAMMAR_VERSION == hub_wire.GRAMMAR_VERSION


def test_a_sessions_grammar_and_logprobs_travel_only_when_asked_for():
    plain = client_wire.OpenSessionRequest(vocab_size=512, vocab_fingerprint="ab" * 32, stop_token_ids=[2])
    assert (
        "constraint" not in plain.to_json() and "top_logprobs" not in plain.to_json()
    )  # an older hub would refuse them
    asked = client_wire.OpenSessionRequest(
        vocab_size=512,
        vocab_fingerprint="ab" * 32,
        stop_token_ids=[2],
        constraint=client_wire.Constraint(grammar='start: "a"', start=7),
        top_logprobs=3,
    )
    parsed = hub_wire.OpenSessionRequest.model_validate(asked.to_json())
    assert parsed.constraint == hub_wire.Constraint(grammar='start: "a"', start=7) and parsed.top_logprobs == 3
    reply = hub_wire.VerifyResponse(
        accepted=0,
        tokens=[4],
        context_len=8,
        verify_ms=1.0,
        logprobs=[hub_wire.TokenLogprobs(logprob=-0.5, top_tokens=[4, 9], top_logprobs=[-0.5, -1.5])],
    )
    assert client_wire.VerifyResponse.from_json(reply.model_dump(exclude_none=True)).logprobs == [
        client_wire.TokenLogprobs(-0.5, [4, 9], [-0.5, -1.5])
    ]


@pytest.mark.parametrize("client_cls, hub_cls", PAIRS, ids=lambda c: c.__name__)
def test_same_field_names(client_cls, hub_cls):
    assert {f.name for f in fields(client_cls)} == set(hub_cls.model_fields)


def test_client_requests_validate_on_the_hub():
    request = client_wire.OpenSessionRequest(
        vocab_size=512,
        vocab_fingerprint="ab" * 32,
        draft_model="draft.gguf",
        sampling=client_wire.Sampling(temperature=0.7, seed=11),
        stop_token_ids=[2],
    )
    parsed = hub_wire.OpenSessionRequest.model_validate(request.to_json())
    assert parsed.sampling.temperature == 0.7 and parsed.sampling.seed == 11
    assert parsed.protocol_version == hub_wire.PROTOCOL_VERSION
    verify = hub_wire.VerifyRequest.model_validate(client_wire.VerifyRequest(tokens=[1, 2], draft=[3]).to_json())
    assert (verify.tokens, verify.draft) == ([1, 2], [3])
    assert hub_wire.FeedRequest.model_validate(client_wire.FeedRequest(tokens=[5]).to_json()).tokens == [5]


def test_hub_responses_parse_on_the_client():
    response = hub_wire.VerifyResponse(accepted=2, tokens=[4, 5, 6], context_len=30, verify_ms=1.5)
    assert client_wire.VerifyResponse.from_json(response.model_dump()) == client_wire.VerifyResponse(
        2, [4, 5, 6], 30, 1.5
    )
    opened = hub_wire.OpenSessionResponse(session_id="s", model="m", max_draft_tokens=8, max_context=100)
    assert client_wire.OpenSessionResponse.from_json(opened.model_dump()).session_id == "s"
    info = hub_wire.HubInfo(
        protocol_version=1, model="m", vocab_size=3, vocab_fingerprint="f", max_draft_tokens=8, max_context=100
    )
    assert client_wire.HubInfo.from_json(info.model_dump()) == client_wire.HubInfo(1, "m", 3, "f", 8, 100)
    hinted = info.model_copy(update={"draft_hint": hub_wire.DraftHint(preset="qwen2.5-coder-0.5b")})
    parsed = client_wire.HubInfo.from_json(hinted.model_dump())
    assert parsed.draft_hint == client_wire.DraftHint(preset="qwen2.5-coder-0.5b")
    chunk = hub_wire.GenerateChunk(tokens=[1, 2], done=True, verifies=3, context_len=9)
    assert client_wire.GenerateChunk.from_json(chunk.model_dump()) == client_wire.GenerateChunk([1, 2], True, 3, 9)
    generate = client_wire.GenerateRequest(mode="speculative", tokens=[4], max_tokens=7, draft_len=3)
    assert hub_wire.GenerateRequest.model_validate(generate.to_json()).mode == "speculative"


def test_hub_refuses_unknown_and_mistyped_fields():
    with pytest.raises(ValueError):
        hub_wire.VerifyRequest.model_validate({"tokens": [1], "draft": [2], "extra": 1})
    with pytest.raises(ValueError):
        hub_wire.VerifyRequest.model_validate({"tokens": ["1"], "draft": []})


def test_whoami_parses_on_the_client():
    answer = hub_wire.WhoAmIResponse(
        user="ada",
        sessions=2,
        tokens_left=90,
        limits=hub_wire.UserLimits(max_sessions_per_user=4, tokens_per_minute=100),
    )
    parsed = client_wire.WhoAmIResponse.from_json(answer.model_dump())
    assert parsed == client_wire.WhoAmIResponse("ada", client_wire.UserLimits(4, 100), 2, 90)


def test_draft_hint_is_a_preset_or_a_hugging_face_file_with_its_sha256():
    from hub_server.config import DraftHint, parse_draft_hint

    assert parse_draft_hint("qwen2.5-coder-0.5b") == DraftHint(preset="qwen2.5-coder-0.5b")
    sha = "1D9614638D18024D0FBB36575A15F1302A3ADF044DF10345688EC4F6E1C4FF32"
    hint = parse_draft_hint(f"Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/q4/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf@{sha}")
    assert hint == DraftHint(
        hf_repo="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
        hf_file="q4/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256=sha.lower(),
    )
    published = hub_wire.DraftHint(**vars(hint))  # what /v1/info carries, as the service builds it
    assert client_wire.DraftHint.from_json(published.model_dump()) == client_wire.DraftHint(**vars(hint))
    for wrong in ("Qwen/model.gguf", "Qwen/repo/file.gguf@abc", "Qwen/repo/file.bin@" + "a" * 64, "two words"):
        with pytest.raises(ValueError, match="--draft-hint takes a preset name"):
            parse_draft_hint(wrong)


def test_stream_frames_agree():
    """A session stream's frames: the client's verify parses on the hub, the hub's answers on the client."""
    import msgpack

    from hub_server import stream as hub_stream
    from hub_server.errors import SessionBusy, SessionNotFound
    from specedge_cli.errors import HubBusy, SessionLost
    from specedge_cli.remote import stream as client_stream

    for parents in ([-1, 0], None):
        frame_id, request = hub_stream.parse_frame(client_stream.verify_frame(2**40, [1, 2], [3, 4], parents))
        assert frame_id == 2**40
        assert request == hub_wire.VerifyRequest(tokens=[1, 2], draft=[3, 4], parents=parents)
    reply = hub_wire.VerifyResponse(accepted=1, tokens=[3, 9], context_len=12, verify_ms=0.5)
    answer = msgpack.unpackb(hub_stream.result_frame(7, reply))
    assert answer["id"] == 7
    assert client_stream.answer_of(answer, "http://hub") == client_wire.VerifyResponse(1, [3, 9], 12, 0.5)
    busy = msgpack.unpackb(hub_stream.error_frame(7, SessionBusy("8 wait", retry_after_s=1)))
    with pytest.raises(HubBusy) as refused:
        client_stream.answer_of(busy, "http://hub")
    assert (refused.value.status, refused.value.code, refused.value.retry_after_s) == (429, "session_busy", 1.0)
    gone = msgpack.unpackb(hub_stream.error_frame(None, SessionNotFound("no such session")))
    with pytest.raises(SessionLost):
        client_stream.answer_of(gone, "http://hub")
