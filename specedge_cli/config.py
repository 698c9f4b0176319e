"""Where `specedge` keeps its files, and the settings of one run.

Precedence for every setting: command-line flag, then environment (SPECEDGE_*), then the
config file, then the default. The directories honour SPECEDGE_HOME so tests and users can
point everything at one folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


def config_dir() -> Path:
    home = os.environ.get("SPECEDGE_HOME")
    return Path(home) / "config" if home else Path(platformdirs.user_config_dir("specedge"))


def data_dir() -> Path:
    home = os.environ.get("SPECEDGE_HOME")
    return Path(home) / "data" if home else Path(platformdirs.user_data_dir("specedge"))


def models_dir() -> Path:
    home = os.environ.get("SPECEDGE_HOME")
    return Path(home) / "models" if home else Path(platformdirs.user_cache_dir("specedge")) / "models"


def config_file() -> Path:
    return config_dir() / "config.json"


def read_config_file() -> dict:
    try:
        values = json.loads(config_file().read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def update_config_file(updates: dict, remove: tuple[str, ...] = ()) -> Path:
    """Merge `updates` into config.json and drop the `remove` keys. It holds the API token, so
    the file is written with mode 0600 inside a 0700 folder, and replaced atomically."""
    folder = config_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    values = {**read_config_file(), **updates}
    for key in remove:
        values.pop(key, None)
    staging = folder / ".config.json.tmp"
    staging.unlink(missing_ok=True)
    with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        json.dump(values, out, indent=2)
    os.replace(staging, config_file())
    return config_file()


def environment_token() -> str | None:
    return os.environ.get("SPECEDGE_TOKEN") or None


@dataclass(frozen=True)
class HubAddress:
    url: str | None
    token: str | None
    insecure: bool = False  # plain http to another machine was allowed on purpose


def hub_address(flag_url: str | None) -> HubAddress:
    """The hub to use, if any: --hub, then SPECEDGE_HUB, then the stored login. The stored token
    goes only to the hub it was stored for; SPECEDGE_TOKEN goes to whichever hub is used."""
    stored = read_config_file()
    url = flag_url or os.environ.get("SPECEDGE_HUB") or stored.get("hub")
    same_hub = url is not None and url.rstrip("/") == str(stored.get("hub", "")).rstrip("/")
    token = environment_token() or (stored.get("token") if same_hub else None)
    insecure = os.environ.get("SPECEDGE_INSECURE", "") not in ("", "0") or (same_hub and stored.get("insecure") is True)
    return HubAddress(url, token, insecure)
