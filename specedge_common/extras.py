"""The hub's own packages: `pip install specedge` is the light client; `specedge[hub]` adds these."""

from __future__ import annotations

import importlib.util

# One importable module of each package the `hub` extra brings (see pyproject.toml).
HUB_MODULES = ("torch", "transformers", "accelerate", "gguf", "safetensors", "fastapi", "pydantic")
HUB_INSTALL = "pip install 'specedge[hub]'"


def missing_hub_modules() -> list[str]:
    """The hub's packages this environment lacks (empty when the hub can run)."""
    return [name for name in HUB_MODULES if not _installed(name)]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses it, or a broken install
        return False
