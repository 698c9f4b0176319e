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
    script = run_specedge("--show-completion", "bash")
    assert script.returncode == 0 and "_SPECEDGE_COMPLETE" in script.stdout
