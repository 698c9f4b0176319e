"""Structured output on a real pair, lossless: for ten JSON schemas (nested objects, enums, arrays,
numbers), Qwen2.5-Coder 0.5B drafting for 1.5B through a real hub, greedy and seeded, every reply
equals the 1.5B target alone decoded by transformers' `generate` with llguidance's mask as its
logits processor, token for token, and validates against its schema.

Slow, and needs the pair in SPECEDGE_QWEN_DIR (see tests/test_serve_qwen.py):
  SPECEDGE_QWEN_DIR=... pytest -m qwen tests/test_grammar_qwen.py
"""

from __future__ import annotations

import json

import llguidance
import llguidance.numpy
import pytest
import torch

from hub_server.engine.sampling import sample_row
from hub_server.tree import position_uniform
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import resolve_model
from specedge_cli.remote.client import HubClient
from specedge_common.grammar import grammar_tokenizer, json_schema_grammar
from tests.conftest import RunningHub
from tests.test_serve_qwen import DRAFT, QWEN_DIR, TARGET

pytestmark = pytest.mark.qwen

_obj = {"type": "object", "additionalProperties": False}
SCHEMAS = {
    "person": {
        **_obj,
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "color": {**_obj, "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    "point": {**_obj, "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]},
    "tags": {
        **_obj,
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
        "required": ["tags"],
    },
    "book": {
        **_obj,
        "properties": {
            "title": {"type": "string"},
            "author": {
                **_obj,
                "properties": {"first": {"type": "string"}, "last": {"type": "string"}},
                "required": ["first", "last"],
            },
            "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
        },
        "required": ["title", "author", "year"],
    },
    "flags": {
        **_obj,
        "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer", "minimum": 0}},
        "required": ["ok", "count"],
    },
    "weather": {
        **_obj,
        "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "temp": {"type": "number"},
        },
        "required": ["city", "unit", "temp"],
    },
    "matrix": {
        **_obj,
        "properties": {
            "rows": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
                "maxItems": 3,
            }
        },
        "required": ["rows"],
    },
    "order": {
        **_obj,
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    **_obj,
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                    "required": ["sku", "qty"],
                },
                "maxItems": 3,
            },
            "express": {"type": "boolean"},
        },
        "required": ["items", "express"],
    },
    "function": {
        **_obj,
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z_]+$"},
            "args": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "args"],
    },
}
ASKS = {
    "person": "Describe Ada Lovelace as JSON.",
    "color": "What color is the sky? Answer in JSON.",
    "point": "Give the point (3, 4.5) as JSON.",
    "tags": "Tag this text as JSON: a python tutorial about sorting lists.",
    "book": "Give the book Dune as JSON.",
    "flags": "Is 7 prime? Answer in JSON with how many divisors it has.",
    "weather": "The weather in Oslo is 5 degrees celsius. As JSON.",
    "matrix": "Give the 2x2 identity matrix as JSON.",
    "order": "Two apples (sku A1) and one pear (sku P2), express delivery. As JSON.",
    "function": "Name a Python function that adds two numbers, with its arguments, as JSON.",
}
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    if not (DRAFT.is_file() and TARGET.is_file()):
        pytest.skip(f"the Qwen2.5-Coder pair is not in SPECEDGE_QWEN_DIR ({QWEN_DIR})")
    hub = RunningHub(TARGET, QWEN_DIR / "hub-cache", "--dtype", "float32", ready_timeout_s=900)
    engine = DraftEngine(DRAFT, n_ctx=2048, n_threads=2)
    try:
        yield hub, engine, template_for(engine.vocab, resolve_model(str(DRAFT), QWEN_DIR))
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def target(pair):
    """The target as transformers loads it alone: the hub's own float32 conversion of the GGUF."""
    from transformers import AutoModelForCausalLM

    converted = (QWEN_DIR / "hub-cache" / "converted").glob(f"{TARGET.stem}-*")
    (folder,) = [f for f in converted if json.loads((f / "config.json").read_text()).get("dtype") == "float32"]
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


class GrammarProcessor:
    """A logits processor for transformers' `generate`: llguidance's mask, then (sampling) the hub's
    position-keyed draw, given as the one token left (so `generate`'s greedy step takes it)."""

    def __init__(self, tokenizer, grammar: str, prompt_len: int, temperature: float, seed: int):
        self.matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        self.prompt_len, self.temperature, self.seed = prompt_len, temperature, seed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_len:
            assert self.matcher.consume_token(int(input_ids[0, -1])), self.matcher.get_error()
        logits = scores.float().numpy().copy()
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        llguidance.numpy.apply_token_bitmask_inplace(logits, self.bitmask)
        row = torch.from_numpy(logits[0])
        if self.temperature == 0:
            return row[None]
        token = sample_row(row, self.temperature, position_uniform(self.seed, input_ids.shape[1]))
        forced = torch.full_like(row, float("-inf"))
        forced[token] = 0.0
        return forced[None]


def target_alone(model, tokenizer, context, grammar, stops, temperature, seed) -> list[int]:
    processor = GrammarProcessor(tokenizer, grammar, len(context), temperature, seed)
    generated = model.generate(
        torch.tensor([context]),
        max_new_tokens=MAX_TOKENS,
        do_sample=False,
        logits_processor=[processor],
        eos_token_id=sorted(stops),
        pad_token_id=sorted(stops)[0],
    )
    return generated[0, len(context) :].tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_ten_schemas_equal_the_target_alone_under_them(temperature, pair, target):
    hub, engine, template = pair
    stops = frozenset(engine.vocab.stop_token_ids())
    tokenizer = grammar_tokenizer(engine.vocab.fingerprint(), engine.vocab.pieces(), sorted(stops))
    verifies = emitted = 0
    with HubClient(hub.url) as client:
        for name, schema in SCHEMAS.items():
            grammar = json_schema_grammar(schema)
            settings = DecodeSettings(max_tokens=MAX_TOKENS, temperature=temperature, seed=3, grammar=grammar)
            conversation = Conversation(engine, client, template, settings)
            reply = conversation.ask(ASKS[name])
            conversation.close()
            context = reply.prompt_token_ids
            expected = target_alone(target, tokenizer, context, grammar, stops, temperature, 3)
            assert reply.token_ids == expected, name
            assert reply.finish_reason == "stop", name
            validate(json.loads(reply.text), schema)
            verifies += reply.stats.verify_rounds
            emitted += len(reply.token_ids)
    print(f"temperature {temperature}: {emitted / verifies:.2f} tokens per verify under the schemas")


def validate(value, schema: dict) -> None:
    """The few JSON-schema rules SCHEMAS use, checked by hand (no validator is a dependency here)."""
    if "enum" in schema:
        assert value in schema["enum"]
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict) and set(schema["required"]) <= set(value) <= set(schema["properties"])
        for key, item in value.items():
            validate(item, schema["properties"][key])
    elif kind == "array":
        assert isinstance(value, list) and len(value) <= schema.get("maxItems", len(value))
        for item in value:
            validate(item, schema["items"])
    elif kind in ("integer", "number"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool)
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value)
        assert kind == "number" or isinstance(value, int)
    elif kind == "string":
        assert isinstance(value, str)
    elif kind == "boolean":
        assert isinstance(value, bool)
