"""The hub's log lines: text for a terminal, one JSON object per line for a log pipeline.

Every line written while a request is served carries that request's id (and its user), taken
from a context variable the access middleware sets. Headers are never logged, so a token never
reaches a log line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time

REQUEST_ID_HEADER = "X-Request-ID"
_current_request: contextvars.ContextVar[dict] = contextvars.ContextVar("hub_request", default={})  # noqa: B039 (never mutated: set() replaces it)
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Fields a record may carry besides its message; the JSON format writes those present.
_FIELDS = ("request_id", "user", "method", "path", "status", "duration_ms")


def request_id_from(header: str | None) -> str:
    """The caller's request id when it is a sane one, else a fresh one."""
    return header if header and _SANE_REQUEST_ID.fullmatch(header) else secrets.token_hex(8)


def bind_request(**fields: str) -> None:
    """Attach fields (request_id, user) to every log line of the current request."""
    _current_request.set({**_current_request.get(), **fields})


def request_fields() -> dict:
    """The fields `bind_request` attached to the current request (carried to the engine process)."""
    return _current_request.get()


class _RequestFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _current_request.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({key: getattr(record, key) for key in _FIELDS if hasattr(record, key)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        tags = " ".join(f"{key}={getattr(record, key)}" for key in ("request_id", "user") if hasattr(record, key))
        return f"{super().format(record)} [{tags}]" if tags else super().format(record)


def configure_logging(log_format: str) -> None:
    """Send the hub's and uvicorn's records to stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_RequestFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
