"""The settings of a run, each taken from the first place that has it: the command-line flag, then
the environment (`SPECEDGE_MAX_TOKENS`, ...), then the config file (`specedge config set
max-tokens 512`), then the default. Validated once, here. The config file also keeps the login
(hub address and token), which `hub_address` combines with --hub, SPECEDGE_HUB and SPECEDGE_TOKEN.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from specedge_cli import paths
from specedge_cli.errors import SettingError
from specedge_cli.models import DEFAULT_MODEL


@dataclass(frozen=True)
class ChatSettings:
    model: str = DEFAULT_MODEL
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    draft_len: int = 0  # draft depth; 0 chooses it from measured timings
    tree_budget: int = 0  # draft tree nodes per verify; 0 drafts a chain
    # Draft the next round while a verify is in flight. None (auto): on with a hub elsewhere, off
    # with an embedded hub, whose forward passes would compete with the drafting for this machine.
    proactive: bool | None = None
    system: str = ""
    threads: int = 0  # 0: llama.cpp's default for this machine
    offline: bool = False
    logs: bool = True
    reconnect_s: float = 60.0  # how long a reply waits for a hub that went away


@dataclass(frozen=True)
class Reader:
    """How a setting's text is read, and what a refused value is told to be."""

    parse: Callable[[str], Any]
    expected: str = ""


def _boolean(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _boolean_or_auto(text: str) -> bool | None:
    return None if str(text).strip().lower() == "auto" else _boolean(text)


def _number(kind: type, low: float, zero_means: str = "", unit: str = "") -> Reader:
    """A number of `kind` (int or float), at least `low`; `zero_means` says what 0 chooses."""

    def check(text: str) -> Any:
        value = kind(text)
        if value < low:
            raise ValueError(text)
        return value

    noun = unit or ("a whole number" if kind is int else "a number")
    return Reader(check, f"{noun}, 0 for {zero_means}" if zero_means else f"{noun}, at least {low:g}")


READERS: dict[str, Reader] = {
    "model": Reader(str),  # checked by `config set`; a chat's resolve_model says what is wrong with it
    "system": Reader(str),
    "max_tokens": _number(int, 1),
    "temperature": _number(float, 0),
    "seed": _number(int, 0),
    "draft_len": _number(int, 0, zero_means="automatic"),
    "tree_budget": _number(int, 0, zero_means="a chain"),
    "proactive": Reader(_boolean_or_auto, "on, off or auto"),
    "threads": _number(int, 0, zero_means="llama.cpp's default"),
    "offline": Reader(_boolean, "on or off"),
    "logs": Reader(_boolean, "on or off"),
    "reconnect_s": _number(float, 0, unit="seconds"),
}
KEYS = [f.name for f in fields(ChatSettings)]


def key_name(key: str) -> str:
    """The name users type (`max-tokens`) for a field (`max_tokens`)."""
    return key.replace("_", "-")


def env_name(key: str) -> str:
    return "SPECEDGE_" + key.upper()


def field_of(name: str) -> str:
    key = name.replace("-", "_")
    if key not in READERS:
        raise SettingError(f"unknown setting {name!r}; known: hub, {', '.join(key_name(k) for k in KEYS)}")
    return key


def parse(key: str, value: Any, where: str) -> Any:
    reader = READERS[key]
    try:
        return reader.parse(value)
    except (TypeError, ValueError):
        expected = f" (expected {reader.expected})" if reader.expected else ""
        raise SettingError(
            f"{where}: {value!r} is not a valid {key_name(key)}{expected}; "
            f"fix it or run `specedge config set {key_name(key)} VALUE`"
        ) from None


def lookup(key: str, flag: Any = None, stored: dict | None = None) -> tuple[Any, str]:
    """A setting's value and where it came from: flag, env, config or default."""
    stored = read_config_file() if stored is None else stored
    if flag is not None:
        return flag, "flag"
    if env_name(key) in os.environ:
        return parse(key, os.environ[env_name(key)], env_name(key)), "env"
    if key_name(key) in stored:
        return parse(key, stored[key_name(key)], f"{paths.config_file()} ({key_name(key)})"), "config"
    return getattr(ChatSettings(), key), "default"


def chat_settings(**flags: Any) -> ChatSettings:
    """The settings of this run, given the flags on its command line (None where not given)."""
    stored = read_config_file()
    return ChatSettings(**{key: lookup(key, flags.get(key), stored)[0] for key in KEYS})


# --- the config file ----------------------------------------------------------------------
def read_config_file() -> dict:
    try:
        values = json.loads(paths.config_file().read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def update_config_file(updates: dict, remove: tuple[str, ...] = ()) -> Path:
    """Merge `updates` into config.json and drop the `remove` keys. It holds the API token, so
    the file is written with mode 0600 inside a 0700 folder, and replaced atomically."""
    folder = paths.config_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    values = {**read_config_file(), **updates}
    for key in remove:
        values.pop(key, None)
    staging = folder / ".config.json.tmp"
    staging.unlink(missing_ok=True)
    with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        json.dump(values, out, indent=2)
    os.replace(staging, paths.config_file())
    return paths.config_file()


# --- the hub and its token --------------------------------------------------------------------
LOGIN_KEYS = ("hub", "token", "insecure")  # what `specedge login` stores and `logout` forgets


def environment_token() -> str | None:
    return os.environ.get("SPECEDGE_TOKEN") or None


def normalize_hub_url(url: str) -> str:
    """The hub's root URL: users paste `.../v1` (the API's prefix) or a trailing slash; routes add /v1 themselves."""
    url = url.strip().rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


@dataclass(frozen=True)
class HubAddress:
    url: str | None
    token: str | None
    insecure: bool = False  # plain http to another machine was allowed on purpose
    token_from_env: bool = False  # the token is SPECEDGE_TOKEN's, which overrides the stored login


def hub_address(flag_url: str | None) -> HubAddress:
    """The hub to use, if any: --hub, then SPECEDGE_HUB, then the stored login. The stored token
    goes only to the hub it was stored for; SPECEDGE_TOKEN goes to whichever hub is used."""
    stored = read_config_file()
    given = flag_url or os.environ.get("SPECEDGE_HUB") or stored.get("hub")
    url = normalize_hub_url(given) if given else None
    same_hub = url is not None and url == normalize_hub_url(str(stored.get("hub", "")))
    token = environment_token() or (stored.get("token") if same_hub else None)
    insecure = os.environ.get("SPECEDGE_INSECURE", "") not in ("", "0") or (same_hub and stored.get("insecure") is True)
    return HubAddress(url, token, insecure, token_from_env=environment_token() is not None)
