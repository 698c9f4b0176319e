"""What users of other command-line tools reach for first: --version, -h, completion, clean help."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_specedge

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
