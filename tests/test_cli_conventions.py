"""What users of other command-line tools reach for first: --version, -h, completion, clean help."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_specedge

COMMANDS = [
    [],
    ["chat"],
    ["serve"],
    ["bench"],
    ["login"],
    ["whoami"],
    ["logout"],
    ["doctor"],
    ["logs"],
    ["logs", "list"],
    ["models"],
    ["models", "pull"],
    ["config"],
    ["config", "set"],
]


def test_version():
    from importlib import metadata

    result = run_specedge("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"specedge {metadata.version('specedge')}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_dash_h_is_help_and_help_has_no_space_before_a_full_stop(command):
    result = run_specedge(*command, "-h", env_extra={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "Usage: specedge" in result.stdout
    assert not re.search(r"\w \.(\s|$)", result.stdout), result.stdout


def test_shell_completion_is_offered():
    assert "--install-completion" in run_specedge("-h").stdout
    # Typer detects the shell from the process tree; its own switch names it instead (a test runner has none).
    script = run_specedge("--show-completion", "bash", env_extra={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert script.returncode == 0 and "_SPECEDGE_COMPLETE" in script.stdout


# One meaning per short flag in every command (-n: how many, of tokens to generate or of
# conversations listed, as in `head -n` and `llm logs -n`).
SHORT_FLAGS = {
    "-m": {"--model"},
    "-t": {"--threads"},
    "-n": {"--max-tokens", "--n-gen", "--count"},
    "-p": {"--prompt"},
    "-o": {"--output"},
    "-r": {"--repetitions"},
    "-c": {"--continue"},
    "-h": {"--help"},
    "-V": {"--version"},
}


def test_short_flags_mean_the_same_in_every_command():
    import click
    import typer

    from specedge_cli.main import app

    def walk(command: click.Command, path: str):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    seen = {}
    for path, command in walk(typer.main.get_command(app), "specedge"):
        context = click.Context(command, info_name=path)
        for param in command.get_params(context):
            shorts = [o for o in param.opts + param.secondary_opts if len(o) == 2]
            longs = [o for o in param.opts if o.startswith("--")]
            for short in shorts:
                seen.setdefault(short, set()).update(longs)
                assert short in SHORT_FLAGS and set(longs) <= SHORT_FLAGS[short], (path, short, longs)
    assert {"-m", "-t", "-n", "-p", "-V"} <= set(seen)  # -h: the help tests above


def run_hub_server(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hub_server", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env_extra or {})},
    )


def test_hub_server_takes_dash_h_and_version():
    from importlib import metadata

    version = run_hub_server("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hub_server {metadata.version('specedge')}"
    for command in ([], ["serve"], ["workers"]):
        shown = run_hub_server(*command, "-h", env_extra={"COLUMNS": "200"})
        assert shown.returncode == 0 and "Usage: hub_server" in shown.stdout, shown.stderr
    assert "--draft-hint" in run_hub_server("serve", "-h", env_extra={"COLUMNS": "200"}).stdout


def test_hub_server_workers_without_a_token_names_its_own_token_option(auth_hub):
    env = {key: value for key, value in os.environ.items() if key != "SPECEDGE_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "hub_server", "workers", "--hub", auth_hub.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pass an operator's token with --token" in result.stderr and "specedge login" not in result.stderr
