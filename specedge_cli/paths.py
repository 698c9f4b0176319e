"""Where `specedge` keeps its files: config, data (conversations, the embedded hub's log) and models.

Every folder honours SPECEDGE_HOME, so tests and users can point everything at one place. What
the config file holds, and how it combines with flags and the environment, is `settings.py`.
"""

from __future__ import annotations

import os
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
