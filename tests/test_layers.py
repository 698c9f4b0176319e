"""The layers hold: outside `hub_server/engine/` the hub imports no torch, the shared package
neither torch nor FastAPI, and the hub never imports the client."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import hub_server

REPO = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter: a finder placed first refuses the named top-level packages.
BLOCKER = """
import importlib, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} imported by a module that must not need it")
        return None
BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, Refuse())
for module in sys.argv[2:]:
    importlib.import_module(module)
"""


def _import_with_blocked(blocked: list[str], modules: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, ",".join(blocked), *modules],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _hub_modules_outside_engine() -> list[str]:
    found = pkgutil.walk_packages(hub_server.__path__, prefix="hub_server.")
    names = [m.name for m in found if m.name != "hub_server.__main__"]  # __main__ would run the command
    return [name for name in names if not name.startswith("hub_server.engine.") and name != "hub_server.engine"]


def test_every_hub_module_outside_the_engine_imports_without_torch():
    modules = _hub_modules_outside_engine()
    assert {"hub_server.service", "hub_server.app", "hub_server.scheduler", "hub_server.cli"} <= set(modules)
    result = _import_with_blocked(["torch", "transformers", "specedge_cli"], modules)
    assert result.returncode == 0, result.stderr


def test_the_blocker_would_catch_an_engine_import():
    """The check above can fail: the engine itself needs torch."""
    result = _import_with_blocked(["torch"], ["hub_server.engine.runner"])
    assert result.returncode != 0 and "torch imported by a module" in result.stderr


def test_the_shared_package_imports_neither_side_nor_torch_nor_fastapi():
    import specedge_common

    modules = [m.name for m in pkgutil.walk_packages(specedge_common.__path__, prefix="specedge_common.")]
    assert modules
    blocked = ["torch", "transformers", "fastapi", "pydantic", "hub_server", "specedge_cli"]
    result = _import_with_blocked(blocked, modules)
    assert result.returncode == 0, result.stderr
