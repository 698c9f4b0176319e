"""Structured output: which tokens a grammar allows after a token path, the same on both sides.

The client drafts only tokens the grammar allows, and the hub draws the target's token at every
draft node from the target's distribution restricted to the tokens the grammar allows after that
node's path. Both sides build the grammar's tokenizer from the vocabulary's pieces (equal on both
sides: the session's fingerprint says so) with the functions here, so their masks agree bit for bit.

The engine is llguidance (no torch, so the light client can run it; xgrammar needs torch). A mask is
llguidance's bitmask: int32 words, bit `t % 32` of word `t // 32` set when token t is allowed.
A session's stop tokens are the grammar's end tokens: allowed exactly where the grammar may end.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from specedge_common.vocab import SPACE_MARK

if TYPE_CHECKING:
    from llguidance import LLTokenizer

# JSON as OpenAI's structured outputs write it: one space after a colon and a comma, no newlines.
# Without a fixed layout, flexible whitespace lets a model pad its JSON with blank lines forever.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

_SPECIAL = re.compile(r"^(<\|.*\|>|<(s|/s|unk|pad|bos|eos|mask)>|<(start|end)_of_\w+>|<unused\d+>)$")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class GrammarError(ValueError):
    """A grammar llguidance cannot compile, or a token it does not allow; the message says which."""


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level BPE spelling: each byte as one printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_table()


def token_bytes(pieces: Sequence[str]) -> list[bytes]:
    """Each token's bytes as llguidance reads them (special tokens prefixed with 0xFF, so no text
    matches them). A vocabulary is byte-level BPE (Qwen, GPT-2: 'Ġ' for a space) when more pieces
    hold 'Ġ' than SentencePiece's space mark; otherwise SentencePiece (byte pieces spelled <0xNN>)."""
    normal = [piece.replace(SPACE_MARK, " ") for piece in pieces]
    byte_level = sum("Ġ" in piece for piece in pieces) > sum(SPACE_MARK in piece for piece in pieces)
    out = []
    for piece, spelled in zip(pieces, normal):
        byte = _BYTE_PIECE.match(piece)
        if _SPECIAL.match(piece):
            out.append(b"\xff" + piece.encode())
        elif byte:
            out.append(bytes([int(byte.group(1), 16)]))
        elif byte_level and all(char in _BYTE_LEVEL for char in piece):
            out.append(bytes(_BYTE_LEVEL[char] for char in piece))
        else:
            out.append(spelled.encode("utf-8", "surrogatepass"))
    return out


class _Pieces:
    """What llguidance's tokenizer is built from: the tokens' bytes, the end tokens, and a greedy
    longest-match tokenizer (llguidance tokenizes the text a grammar forces with it)."""

    def __init__(self, tokens: list[bytes], end_tokens: Sequence[int]):
        self.is_tokenizer_wrapper = True
        self.tokens = tokens
        self.eos_token_id = end_tokens[0]
        self.bos_token_id = None
        self.special_token_ids = [i for i, t in enumerate(tokens) if t.startswith(b"\xff")]
        self._ids: dict[bytes, int] = {}
        for index, token in enumerate(tokens):
            if token and not token.startswith(b"\xff"):
                self._ids.setdefault(token, index)
        self._longest = max((len(t) for t in self._ids), default=1)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        ids, at = [], 0
        while at < len(data):
            for size in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at : at + size])
                if token is not None:
                    ids.append(token)
                    at += size
                    break
            else:
                at += 1  # a byte no token spells: nothing can stand for it
        return ids


_tokenizers: dict[tuple[str, tuple[int, ...]], LLTokenizer] = {}
_tokenizers_lock = threading.Lock()
_prepared: set[tuple[str, tuple[int, ...]]] = set()  # the tokenizers built, or being built, in the background
_prepared_lock = threading.Lock()


def grammar_tokenizer(
    fingerprint: str, pieces: Sequence[str] | Callable[[], Sequence[str]], end_tokens: Sequence[int]
) -> LLTokenizer:
    """llguidance's tokenizer for a vocabulary (by its fingerprint) whose stop tokens end a grammar;
    built once (about a second for a 150k vocabulary) and kept. `pieces`: the vocabulary's pieces,
    or what reads them (called only when the tokenizer is built)."""
    import llguidance

    if not end_tokens:
        raise GrammarError("a constrained session needs at least one stop token to end its reply")
    key = (fingerprint, tuple(sorted(end_tokens)))
    with _tokenizers_lock:
        if key not in _tokenizers:
            listed = pieces() if callable(pieces) else pieces
            wrapper = _Pieces(token_bytes(listed), key[1])
            # llguidance reads a wrapper by its attributes (is_tokenizer_wrapper, tokens, ...), not its class
            _tokenizers[key] = llguidance.LLTokenizer(cast(Any, wrapper), n_vocab=len(listed), eos_token=list(key[1]))
        return _tokenizers[key]


def prepare_grammar_tokenizer(
    fingerprint: str, pieces: Sequence[str] | Callable[[], Sequence[str]], end_tokens: Sequence[int]
) -> None:
    """Build `grammar_tokenizer(...)` on a thread of its own, once a process for each vocabulary and
    end tokens, so the first constrained reply does not wait for all of it (a call meanwhile waits
    only for the rest). A vocabulary with no end tokens is left for that reply to refuse."""
    key = (fingerprint, tuple(sorted(end_tokens)))
    with _prepared_lock:
        if not end_tokens or key in _prepared:
            return
        _prepared.add(key)
    build = functools.partial(grammar_tokenizer, fingerprint, pieces, end_tokens)
    threading.Thread(target=build, daemon=True, name="grammar-vocabulary").start()


def json_schema_grammar(schema: dict) -> str:
    """The llguidance grammar of JSON that validates against `schema`, laid out as JSON_LAYOUT."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)  # type: ignore[arg-type]
    except ValueError as exc:
        raise GrammarError(f"the JSON schema cannot be compiled ({exc})") from exc


def lark_grammar(lark: str) -> str:
    """The llguidance grammar of a Lark grammar (llguidance's dialect: `%json {schema}` included)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def check_grammar(grammar: str, tokenizer: LLTokenizer) -> None:
    """GrammarError saying why, when llguidance cannot compile `grammar`."""
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if problem and not problem.startswith("WARNING"):
        raise GrammarError(f"the grammar cannot be compiled: {problem}")


class Constraint:
    """A grammar over the context's tokens from `start` on: it follows the context as it grows
    (`advance`) and gives the masks of the tokens it allows after a draft's paths (`tree_masks`)."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str, start: int):
        import llguidance

        self.start = start
        self.vocab_size = tokenizer.vocab_size
        self.end_tokens = frozenset(tokenizer.eos_tokens)
        self._matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {self._matcher.get_error()}")
        self.consumed = 0  # context tokens past `start` the matcher holds
        # llguidance's masks have a word more than the vocabulary needs when its size is a multiple of 32
        self.words = len(self._matcher.compute_bitmask()) // 4

    def advance(self, context: Sequence[int]) -> None:
        """Take the context's tokens the matcher has not yet seen; GrammarError (the matcher as it
        was) at the first one the grammar does not allow."""
        new = list(context[self.start + self.consumed :]) if len(context) > self.start else []
        for index, token in enumerate(new):
            if not self.allows(token):
                self._matcher.rollback(index)
                position = self.start + self.consumed + index
                raise GrammarError(
                    f"token {token} at position {position} breaks the session's grammar (its reply starts at "
                    f"position {self.start}); send only tokens the grammar allows, or open a new session"
                )
            self._matcher.consume_token(token)
        self.consumed += len(new)

    def allows(self, token: int) -> bool:
        """Whether the grammar allows `token` next."""
        if token in self.end_tokens:  # llguidance's validate_tokens does not count the end tokens
            # where the grammar may end, or where it failed (`mask` then lets the reply end)
            return self._matcher.is_accepting() or self._matcher.is_error()
        return 0 <= token < self.vocab_size and self._matcher.validate_tokens([token]) == 1

    def mask(self) -> np.ndarray:
        """The tokens allowed next: [words] int32. A grammar that allows nothing (it failed) lets
        the reply end, never leaves the choice to an empty set."""
        mask = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.int32).copy()
        if not mask.any():
            words = mask.view(np.uint32)
            for token in self.end_tokens:
                words[token // 32] |= np.uint32(1 << (token % 32))
        return mask

    def mask_after(self, context: Sequence[int]) -> np.ndarray | None:
        """The tokens allowed after `context` (what `advance` took, then more): None where the
        grammar does not cover the next position yet, or does not allow the context's new tokens
        (no draft below them can be accepted, so it need not be masked)."""
        if len(context) < self.start:
            return None
        new = list(context[self.start + self.consumed :])
        taken = self._matcher.try_consume_tokens(new) if new else 0
        try:
            return self.mask() if taken == len(new) else None
        finally:
            self._matcher.rollback(taken)

    def tree_masks(self, draft: Sequence[int], parents: Sequence[int]) -> np.ndarray:
        """The tokens allowed after the root and after each draft node's path: [N + 1, words]
        int32 (row 0 the root, row i + 1 node i). A node the grammar does not allow can never be
        accepted (the target's choice at its parent is an allowed one), so its row and those under
        it allow everything: they are never read. A node is allowed when its parent's mask has it
        (llguidance's masks hold the canonical tokenization of text a grammar forces, a stricter
        rule than its `validate_tokens`)."""
        masks = np.full((len(draft) + 1, self.words), -1, dtype=np.int32)
        masks[0] = self.mask()
        children: list[list[int]] = [[] for _ in range(len(draft) + 1)]
        for node, parent in enumerate(parents):
            children[parent + 1].append(node)
        # Depth first, so that the matcher always holds a prefix of the next node's path: a node's
        # parent is the last node taken, or one it rolls back to.
        held: list[int] = []  # the nodes the matcher holds now, root first
        stack = [(node, 0) for node in reversed(children[0])]  # (node, its parent's depth)
        while stack:
            node, depth = stack.pop()
            self._matcher.rollback(len(held) - depth)
            del held[depth:]
            token = draft[node]
            if not _has(masks[parents[node] + 1], token) or token in self.end_tokens:
                continue  # never accepted, or the reply ends there: nothing under it is read
            self._matcher.consume_token(token)
            held.append(node)
            masks[node + 1] = self.mask()
            stack += [(child, depth + 1) for child in reversed(children[node + 1])]
        self._matcher.rollback(len(held))
        return masks


def _has(mask: np.ndarray, token: int) -> bool:
    return 0 <= token < 32 * len(mask) and bool((int(mask[token // 32]) >> (token % 32)) & 1)


def allowed(mask: np.ndarray, size: int) -> np.ndarray:
    """A bitmask [..., words] as booleans [..., size]."""
    bits = np.unpackbits(np.ascontiguousarray(mask).view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :size].astype(bool)
