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


def read_config_file() -> dict:
    try:
        return json.loads((config_dir() / "config.json").read_text())
    except (OSError, ValueError):
        return {}


@dataclass(frozen=True)
class HubAddress:
    url: str | None
    token: str | None


def hub_address(flag_url: str | None) -> HubAddress:
    """The hub to use, if any: --hub, then SPECEDGE_HUB, then the stored login."""
    stored = read_config_file()
    url = flag_url or os.environ.get("SPECEDGE_HUB") or stored.get("hub")
    token = os.environ.get("SPECEDGE_TOKEN") or stored.get("token")
    return HubAddress(url, token)
