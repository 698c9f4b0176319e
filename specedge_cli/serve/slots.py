"""Drafting contexts for `specedge serve`, and the requests they decode.

A slot is one draft engine (its llama.cpp context and KV cache) with the hub session of the
conversation it last served. A request goes to the free slot whose history it continues furthest:
a chat whose earlier turns are that slot's turns (same texts, so the same token ids: the replies'
tokens are the ones the target produced), or a completion whose prompt tokens start with that
slot's history. Then only the new tokens travel to the hub, and the draft re-evaluates nothing it
holds. With every slot busy, requests wait in a queue, first come first served.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from jinja2.exceptions import TemplateError

from specedge_cli.conversation import Conversation, Prompt
from specedge_cli.decoding import STOP, DecodeSettings
from specedge_cli.errors import ApiError, HubBusy, HubError, HubRejected, HubUnreachable, SpecEdgeError
from specedge_cli.remote.protocol import TokenLogprobs
from specedge_cli.remote.session import ReplyTerms
from specedge_cli.serve.layout import take_up_exchanges
from specedge_cli.serve.openai_api import Answer, ChatRequest, CompletionRequest, Options
from specedge_cli.serve.reply_text import ReplyText
from specedge_cli.serve.structured import TokenLogprob
from specedge_cli.serve.tools import AssistantMessage, CallReader, ToolCall, check_template

# Sees reply text as it becomes final, and each tool call once it is whole, with the target's
# logprobs of the tokens the piece carries (none unless the request asked for them); returns False
# when the client has gone away.
OnPiece = Callable[[str | ToolCall, tuple[TokenLogprob, ...]], bool]
# Replies with tool calls whose text as the model wrote it is remembered, so a client sending one
# back continues the slot that holds its tokens.
REMEMBERED_CALL_REPLIES = 4096


@dataclass(frozen=True)
class Chat:
    """A chat request as the slot's conversation takes it: replies as the model wrote them."""

    system: str
    tools: list[dict] | None  # shown to the model by the chat template
    exchanges: tuple[tuple[Prompt, str], ...]
    prompt: Prompt
    reply_start: str = ""  # the start of the reply, put in the model's mouth (a call it must make)


@dataclass
class Slot:
    conversation: Conversation
    holds_chat: bool = True  # the conversation's turns describe its history (not so after a completion)
    last_used: float = 0.0

    def chat_overlap(self, chat: Chat) -> int:
        """How many of this slot's history tokens `chat` continues: the turns both have."""
        return sum(
            len(t.prompt_token_ids) + len(t.token_ids) for t in self.conversation.turns[: self._same_turns(chat)]
        )

    def _same_turns(self, chat: Chat) -> int:
        conversation = self.conversation
        if not self.holds_chat or conversation.system != chat.system or conversation.tools != chat.tools:
            return 0
        same = 0
        for turn, (prompt, reply) in zip(conversation.turns, chat.exchanges):
            if turn.sent_prompt != prompt or turn.reply != reply or turn.interrupted:
                break
            same += 1
        return same

    def token_overlap(self, tokens: list[int]) -> int:
        """How many of this slot's history tokens start `tokens` (all of them, or none)."""
        history = self.conversation.history
        return len(history) if history == tokens[: len(history)] else 0

    def take_up_chat(self, chat: Chat) -> list[int]:
        """Make the conversation the chat's history: the turns both have, then the rest from its
        text; the tokens its last prompt will add."""
        conversation, same = self.conversation, self._same_turns(chat)
        if same:
            conversation.restore(conversation.turns[:same])
        else:
            conversation.reset(chat.system, chat.tools)
        self.holds_chat = True
        return take_up_exchanges(conversation, chat.exchanges[same:], chat.prompt)

    def take_up_tokens(self, tokens: list[int]) -> list[int]:
        """Make the conversation hold the part of `tokens` it can keep; the rest, to send."""
        keep = self.token_overlap(tokens)
        self.conversation.reset()
        self.conversation.history = tokens[:keep]
        self.holds_chat = False
        return tokens[keep:]


class SlotPool:
    """The slots, handed to one request at a time each; the others queue, first come first served."""

    def __init__(self, slots: list[Slot], max_waiting: int = 64):
        self.slots = slots
        self.max_waiting = max_waiting
        self._free = list(slots)
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def take(self, overlap: Callable[[Slot], int]) -> Iterator[Slot]:
        """The free slot with the largest `overlap` (then the one idle longest), once it is this request's turn."""
        slot = self._acquire(overlap)
        try:
            yield slot
        finally:
            with self._changed:
                slot.last_used = time.monotonic()
                self._free.append(slot)
                self._changed.notify_all()

    def _acquire(self, overlap: Callable[[Slot], int]) -> Slot:
        ticket = object()
        with self._changed:
            if not self._free and len(self._queue) >= self.max_waiting:
                raise ApiError(
                    f"the server is busy ({len(self.slots)} requests decoding, {len(self._queue)} waiting); "
                    "retry shortly, or start `specedge serve` with a larger --parallel",
                    status=503,
                    code="server_busy",
                )
            self._queue.append(ticket)
            while self._queue[0] is not ticket or not self._free:
                self._changed.wait()
            self._queue.popleft()
            slot = max(self._free, key=lambda s: (overlap(s), -s.last_used))
            self._free.remove(slot)
            self._changed.notify_all()  # the next in the queue may take another free slot
            return slot


class EdgeModel:
    """The one model `specedge serve` offers: the hub's target, drafted for by the pool's slots."""

    def __init__(self, model_id: str, pool: SlotPool, defaults: DecodeSettings, add_bos: bool):
        self.model_id = model_id
        self.pool = pool
        self.defaults = defaults
        self.add_bos = add_bos
        self.created = int(time.time())
        first = pool.slots[0].conversation
        self._tokenizer = first.engine.vocab  # tokenizing reads the vocabulary only
        self._template = first.template
        self._renders_tools = self._template.renders_tools()
        self.hub_context = first.hub.info().max_context
        # A prompt and its reply must fit the hub's context and the draft's alike.
        self.max_context = min(self.hub_context, first.engine.n_ctx)
        self._call_replies: OrderedDict[str, str] = OrderedDict()  # AssistantMessage.key() -> the text written
        self._call_replies_lock = threading.Lock()

    def check_model(self, model: str) -> None:
        if model not in (self.model_id, "specedge"):
            raise ApiError(
                f"the model {model!r} does not exist here; this server serves {self.model_id!r} (GET /v1/models)",
                status=404,
                code="model_not_found",
                param="model",
            )

    def chat(self, request: ChatRequest, on_piece: OnPiece) -> Answer:
        """Answer the last user message of a chat, as `specedge chat` would after the same turns."""
        self.check_model(request.model)
        try:
            chat = self._chat(request)
            with self.pool.take(lambda slot: slot.chat_overlap(chat)) as slot:
                return self._chat_in(slot, chat, request, on_piece)
        except TemplateError as exc:
            message = f"the model's chat template could not lay out these messages ({exc})"
            raise ApiError(message, param="messages") from exc

    def _chat_in(self, slot: Slot, chat: Chat, request: ChatRequest, on_piece: OnPiece) -> Answer:
        conversation = slot.conversation
        prompt_tokens = slot.take_up_chat(chat)
        before = len(conversation.history)
        room = self._room(before + len(prompt_tokens), "messages")
        conversation.change_settings(self._settings(request.options, room))
        cached = self._held(conversation)
        uses = request.tool_use
        reader = CallReader(uses.names) if uses is not None and uses.reads_calls else None
        one_call = uses is not None and not uses.parallel
        relay = _Relay(
            self._reply_text(conversation, request.options), on_piece, reader, one_call, _logprobs(conversation)
        )
        relay.start(chat.reply_start)
        try:
            reply = conversation.ask(chat.prompt, on_tokens=relay, reply_start=chat.reply_start)
        except HubError as exc:
            raise _hub_failure(exc) from exc
        answer = self._answer(relay, reply.finish_reason, before + len(reply.prompt_token_ids), reply.token_ids, cached)
        if answer.tool_calls:
            self._remember(AssistantMessage(answer.text, answer.tool_calls), reply.text)
        return answer

    def _chat(self, request: ChatRequest) -> Chat:
        """The request with its replies as the model wrote them, and the tools it shows the model."""
        uses = request.tool_use
        if request.uses_tools:
            check_template(self._renders_tools, self._template.source)
        tools = uses.shown if uses is not None else None
        exchanges = tuple((prompt, self._written(reply, tools)) for prompt, reply in request.exchanges)
        start = uses.reply_start() if uses is not None else ""
        return Chat(request.system, tools, exchanges, request.prompt, start)

    def _written(self, reply: AssistantMessage, tools: list[dict] | None) -> str:
        """An earlier reply as the model wrote it: its calls in the model's markup, exactly as this
        server read them when it gave them (then its slot still holds their tokens)."""
        if not reply.tool_calls:
            return reply.content
        with self._call_replies_lock:
            written = self._call_replies.get(reply.key())
        if written is not None:
            return written
        text = self._template.reply_text(reply.template_dict(), tools)
        if text is None:
            raise ApiError(
                "this model's chat template lays out an assistant message's tool_calls in a way this server "
                "cannot take apart from the rest of the conversation",
                param="messages",
            )
        return text

    def _remember(self, reply: AssistantMessage, written: str) -> None:
        with self._call_replies_lock:
            self._call_replies[reply.key()] = written
            while len(self._call_replies) > REMEMBERED_CALL_REPLIES:
                self._call_replies.popitem(last=False)

    def complete(self, request: CompletionRequest, on_piece: OnPiece) -> Answer:
        """Continue a prompt (plain completion: no chat template), or fill in the middle between it
        and a suffix."""
        self.check_model(request.model)
        if request.suffix:
            tokens = self._infill_tokens(str(request.prompt), request.suffix)
        else:
            tokens = self._prompt_tokens(request.prompt)
        room = self._room(len(tokens), "prompt")
        with self.pool.take(lambda slot: slot.token_overlap(tokens)) as slot:
            conversation = slot.conversation
            conversation.change_settings(self._settings(request.options, room))
            pending = slot.take_up_tokens(tokens)
            cached = self._held(conversation)
            relay = _Relay(self._reply_text(conversation, request.options), on_piece, logprobs=_logprobs(conversation))
            try:
                generation = conversation.decoder.generate(pending, on_tokens=relay)
            except HubError as exc:
                raise _hub_failure(exc) from exc
            if generation.error is not None:
                raise _hub_failure(generation.error) from generation.error
            return self._answer(relay, generation.finish_reason, len(tokens), generation.tokens, cached)

    def _room(self, prompt_tokens: int, param: str) -> int:
        """How many tokens a reply may have after a prompt of `prompt_tokens` (the conversation's
        included); a prompt that leaves none is refused here, before any drafting or hub work."""
        room = self.max_context - prompt_tokens
        if room > 0:
            return room
        whose = "" if self.max_context == self.hub_context else f" (the draft's here; the hub's is {self.hub_context})"
        raise ApiError(
            f"This model's maximum context length is {self.max_context} tokens{whose}. However, your {param} "
            f"resulted in {prompt_tokens} tokens, which leaves no room for a reply. Please reduce the length "
            f"of the {param}.",
            code="context_length_exceeded",
            param=param,
        )

    def _settings(self, options: Options, room: int) -> DecodeSettings:
        """The server's settings, with what the request chose; a reply ends (`length`) where the
        context does."""
        d = self.defaults
        return replace(
            d,
            max_tokens=min(room, d.max_tokens if options.max_tokens is None else options.max_tokens),
            temperature=d.temperature if options.temperature is None else options.temperature,
            seed=d.seed if options.seed is None else options.seed,
            grammar=options.grammar,
            top_logprobs=options.top_logprobs,
        )

    def _prompt_tokens(self, prompt: str | tuple[int, ...]) -> list[int]:
        if isinstance(prompt, tuple):
            vocab = self._tokenizer.size
            if not all(0 <= token < vocab for token in prompt):
                raise ApiError(f"'prompt' holds token ids outside the vocabulary [0, {vocab})", param="prompt")
            return list(prompt)
        tokens = self._tokenizer.tokenize(prompt, add_bos=self.add_bos)
        if not tokens:
            raise ApiError("'prompt' is empty", param="prompt")
        return tokens

    def _infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        """A fill-in-the-middle prompt in the model's own tokens: prefix, suffix, then the middle."""
        fim = self._tokenizer.fim_tokens()
        if fim is None:
            raise ApiError(
                "'suffix' asks to fill in the middle, and this model has no fill-in-the-middle tokens; "
                "use a code model trained for it (Qwen2.5-Coder has them), or leave suffix out",
                param="suffix",
                code="fim_not_supported",
            )
        before, after, middle = fim
        tokenize = self._tokenizer.tokenize
        bos = [self._tokenizer.bos_token_id] if self.add_bos else []
        return [*bos, before, *tokenize(prefix, add_bos=False), after, *tokenize(suffix, add_bos=False), middle]

    @staticmethod
    def _held(conversation: Conversation) -> int:
        settings, session = conversation.settings, conversation.session
        # A grammar starts where its reply does, so a constrained reply always opens a session of its own.
        if settings.grammar or session.terms != ReplyTerms(None, settings.top_logprobs):
            return 0
        return session.reusable_for(conversation.history, settings.sampling)

    @staticmethod
    def _reply_text(conversation: Conversation, options: Options) -> ReplyText:
        return ReplyText(conversation.engine.vocab.detokenize, conversation.stop_token_ids, options.stop)

    @staticmethod
    def _answer(relay: _Relay, finish_reason: str, prompt_tokens: int, reply_tokens: list[int], cached: int) -> Answer:
        relay.finish()
        if relay.text.stopped:
            finish_reason = STOP
        if relay.calls and finish_reason == STOP:
            finish_reason = "tool_calls"
        answer = Answer(relay.shown, finish_reason, prompt_tokens, len(reply_tokens), cached, tuple(relay.calls))
        if relay.logprobs is None:
            return answer
        return replace(answer, logprobs=tuple(relay.logprobs.all), text_logprobs=tuple(relay.logprobs.with_text))


class _Relay:
    """Hands reply text to the client as tokens are accepted (through a reader of tool calls when
    the model may call one), each piece with the logprobs of the tokens it carries when they were
    asked for; ends the reply at a stop sequence, after its one call when only one is allowed, or
    when the client has gone away."""

    def __init__(
        self,
        text: ReplyText,
        on_piece: OnPiece,
        reader: CallReader | None = None,
        one_call: bool = False,
        logprobs: _TokenLogprobs | None = None,
    ):
        self.text = text
        self.on_piece = on_piece
        self.reader = reader
        self.one_call = one_call
        self.logprobs = logprobs
        self.client_gone = False
        self.shown = ""  # the text handed out
        self.calls: list[ToolCall] = []

    def start(self, text: str) -> None:
        """The reply's start, put in the model's mouth: read as the reply's own text."""
        if text and self.reader is not None:
            self._hand(self.reader.add(text))

    def __call__(self, tokens: list[int]) -> bool:
        before = None if self.logprobs is None else self.text.copy()
        piece = self.text.add(tokens)
        if before is not None:
            self._note_logprobs(tokens, before)
        if piece:
            self._hand(self.reader.add(piece) if self.reader is not None else [piece])
        return self.client_gone or self.text.stopped or self._called_enough

    def finish(self) -> None:
        rest = self.text.finish()
        if self.reader is None:
            self._hand([rest] if rest else [], final=True)
        else:
            self._hand(self.reader.add(rest) + self.reader.finish(), final=True)
        if self.logprobs is not None and self.logprobs.waiting:  # no piece was left to carry them
            self._give("", self.logprobs.hand(math.inf, with_text=not self.calls))

    def _note_logprobs(self, tokens: list[int], before: ReplyText) -> None:
        """Take the logprobs of newly accepted tokens, each with where its text ends: where all
        of theirs does when it is all shown (most often), else found token by token on the text as
        it was `before` them (seeing the whole text again at each token costs more)."""
        assert self.logprobs is not None
        if self.text.end <= self.text.shown:
            ends = [self.text.end] * len(tokens)
        else:
            ends = []
            for token in tokens:
                before.add([token])
                ends.append(before.end)
        for (token, given), end in zip(self.logprobs.of(tokens), ends):
            if given is not None:
                self.logprobs.add(token, given, end)

    @property
    def _called_enough(self) -> bool:
        return self.one_call and bool(self.calls)

    def _hand(self, pieces: list[str | ToolCall], final: bool = False) -> None:
        """Hand out `pieces`; the last one carries the logprobs of the tokens whose text has been
        shown (all the rest, at the end)."""
        for index, piece in enumerate(pieces):
            if self._called_enough:
                return  # what the model wrote after its one call is not part of the answer
            carried: tuple[TokenLogprob, ...] = ()
            if self.logprobs is not None and index == len(pieces) - 1:
                upto = math.inf if final else self.text.shown
                carried = self.logprobs.hand(upto, with_text=isinstance(piece, str))
            self._give(piece, carried)

    def _give(self, piece: str | ToolCall, carried: tuple[TokenLogprob, ...]) -> None:
        if isinstance(piece, ToolCall):
            self.calls.append(piece)
        else:
            self.shown += piece
        if not self.client_gone and not self.on_piece(piece, carried):
            self.client_gone = True


class _TokenLogprobs:
    """The target's logprobs of a reply's tokens (the decoder gathers them from the verify answers),
    spelled as the answer reports them, each waiting until the text that ends it is handed out."""

    def __init__(
        self,
        spell: Callable[[list[int]], bytes],
        stop_token_ids: frozenset[int],
        given: Callable[[], list[TokenLogprobs]],
    ):
        self._spell = spell
        self._stop_token_ids = stop_token_ids
        self._given = given
        self._read = 0  # of the decoder's logprobs
        self.waiting: deque[tuple[float, TokenLogprob]] = deque()  # (where its text ends, the entry)
        self.all: list[TokenLogprob] = []  # the reply's tokens', stop tokens left out (as from its text)
        self.with_text: list[TokenLogprob] = []  # those handed out with text, not with a tool call

    def of(self, tokens: list[int]) -> list[tuple[int, TokenLogprobs | None]]:
        """Newly accepted tokens, each with the logprobs the hub sent for it."""
        given = self._given()[self._read :]
        self._read += len(given)
        unmatched = max(0, len(tokens) - len(given))
        return [(t, None) for t in tokens[:unmatched]] + list(zip(tokens[unmatched:], given))

    def add(self, token: int, given: TokenLogprobs, text_end: float) -> None:
        if token in self._stop_token_ids:
            return
        spell = self._spell
        top = tuple((*_spelled(spell, t), value) for t, value in zip(given.top_tokens, given.top_logprobs))
        entry = TokenLogprob(*_spelled(spell, token), given.logprob, top)
        self.all.append(entry)
        self.waiting.append((text_end, entry))

    def hand(self, upto: float, with_text: bool) -> tuple[TokenLogprob, ...]:
        """The waiting entries whose text ends by `upto` in the reply's text."""
        handed = []
        while self.waiting and self.waiting[0][0] <= upto:
            handed.append(self.waiting.popleft()[1])
        if with_text:
            self.with_text += handed
        return tuple(handed)


def _logprobs(conversation: Conversation) -> _TokenLogprobs | None:
    """What gathers a reply's logprobs, when its settings ask for them."""
    if conversation.settings.top_logprobs is None:
        return None
    decoder = conversation.decoder
    return _TokenLogprobs(conversation.engine.vocab.detokenize, conversation.stop_token_ids, lambda: decoder.logprobs)


def _spelled(spell: Callable[[list[int]], bytes], token: int) -> tuple[str, bytes]:
    raw = spell([token])
    return raw.decode("utf-8", "replace"), raw


def _hub_failure(exc: SpecEdgeError) -> ApiError:
    """A hub failure, as the API's client should see it."""
    if isinstance(exc, HubRejected) and exc.code == "context_too_long":
        return ApiError(exc.message, status=400, code="context_length_exceeded", param="messages")
    if isinstance(exc, HubRejected) and exc.code in ("hub_lacks_grammars", "bad_grammar"):
        return ApiError(exc.message, status=400, code=exc.code, param="response_format")
    if isinstance(exc, HubBusy):
        return ApiError(exc.message, status=429, code="hub_busy")
    if isinstance(exc, HubUnreachable):
        return ApiError(exc.message, status=503, code="hub_unreachable")
    return ApiError(exc.message, status=502, code="hub_error")
