"""The settings of `specedge chat`, each taken from the first place that has it: the command-line
flag, then the environment (`SPECEDGE_MAX_TOKENS`, ...), then the config file
(`specedge config set max-tokens 512`), then the default. Validated once, here."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Callable

from specedge_cli import config
from specedge_cli.errors import SettingError
from specedge_cli.models import DEFAULT_MODEL


@dataclass(frozen=True)
class ChatSettings:
    model: str = DEFAULT_MODEL
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    draft_len: int = 0          # draft depth; 0 chooses it from measured timings
    tree_budget: int = 0        # draft tree nodes per verify; 0 drafts a chain
    # Draft the next round while a verify is in flight. None (auto): on with a hub elsewhere, off
    # with an embedded hub, whose forward passes would compete with the drafting for this machine.
    proactive: bool | None = None
    system: str = ""
    threads: int = 0            # 0: llama.cpp's default for this machine
    offline: bool = False
    logs: bool = True
    reconnect_s: float = 60.0   # how long a reply waits for a hub that went away


def _boolean(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _boolean_or_auto(text: str) -> bool | None:
    return None if str(text).strip().lower() == "auto" else _boolean(text)


def _at_least(low: float, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def check(text: str):
        value = parse(text)
        if value < low:
            raise ValueError(text)
        return value
    return check


PARSERS: dict[str, Callable[[str], Any]] = {
    "model": str, "max_tokens": _at_least(1, int), "temperature": _at_least(0.0, float), "seed": _at_least(0, int),
    "draft_len": _at_least(0, int), "tree_budget": _at_least(0, int), "proactive": _boolean_or_auto, "system": str, "threads": _at_least(0, int), "offline": _boolean, "logs": _boolean,
    "reconnect_s": _at_least(0.0, float),
}
KEYS = [f.name for f in fields(ChatSettings)]
EXPECTED = {
    "max_tokens": "a whole number, at least 1", "temperature": "a number, at least 0", "seed": "a whole number, at least 0",
    "draft_len": "a whole number, 0 for automatic", "tree_budget": "a whole number, 0 for a chain",
    "proactive": "on, off or auto", "threads": "a whole number, 0 for llama.cpp's default", "offline": "on or off",
    "logs": "on or off", "reconnect_s": "seconds, at least 0",
}


def key_name(key: str) -> str:
    """The name users type (`max-tokens`) for a field (`max_tokens`)."""
    return key.replace("_", "-")


def env_name(key: str) -> str:
    return "SPECEDGE_" + key.upper()


def field_of(name: str) -> str:
    key = name.replace("-", "_")
    if key not in PARSERS:
        raise SettingError(f"unknown setting {name!r}; known: {', '.join(key_name(k) for k in KEYS)}")
    return key


def parse(key: str, value: Any, where: str) -> Any:
    try:
        return PARSERS[key](value)
    except (TypeError, ValueError):
        expected = f" (expected {EXPECTED[key]})" if key in EXPECTED else ""
        raise SettingError(f"{where}: {value!r} is not a valid {key_name(key)}{expected}; "
                           f"fix it or run `specedge config set {key_name(key)} VALUE`") from None


def lookup(key: str, flag: Any = None, stored: dict | None = None) -> tuple[Any, str]:
    """A setting's value and where it came from: flag, env, config or default."""
    stored = config.read_config_file() if stored is None else stored
    if flag is not None:
        return flag, "flag"
    if env_name(key) in os.environ:
        return parse(key, os.environ[env_name(key)], env_name(key)), "env"
    if key_name(key) in stored:
        return parse(key, stored[key_name(key)], f"{config.config_file()} ({key_name(key)})"), "config"
    return getattr(ChatSettings(), key), "default"


def chat_settings(**flags: Any) -> ChatSettings:
    """The settings of this run, given the flags on its command line (None where not given)."""
    stored = config.read_config_file()
    return ChatSettings(**{key: lookup(key, flags.get(key), stored)[0] for key in KEYS})
