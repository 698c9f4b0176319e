"""The docs a newcomer reads stay short, current and true to the code: the command reference
agrees with `--help`, every benchmark command names a script that exists, the README and the
figures page keep their length, and names say what a thing is, not when or by which issue it was made."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from hub_server.cli import app as hub_app
from specedge_cli.main import app as client_app

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CLI_MD = DOCS / "cli.md"

# Ordinals the product's own text never pairs with "session": a user's first, second or third session
# is product language; a higher ordinal would number a stretch of work, which the text never names.
WORK_ORDINAL = (
    r"(?:fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|fourteenth|fifteenth"
    r"|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|\d+(?:st|nd|rd|th))"
)
WORK_SESSION = re.compile(rf"\b{WORK_ORDINAL}[ -](?:work )?(?:session|sitting)s?\b|\bsittings?\b", re.IGNORECASE)
ISSUE_NUMBER = re.compile(r"\bissues? #?\d+\b", re.IGNORECASE)
# A data file numbered by the run that made it: `verify-speed-dispatch-cpu-12c.txt`, `-13-before`.
RUN_NUMBERED_FILE = re.compile(
    r"-\d+[a-z]\.\w+$|-\d+-(?:before|after)\b|[-_](?:session|sitting)[-_]?\d+", re.IGNORECASE
)
# A heading names what its section holds, never an ordinal with "session".
HEADING_SESSION = re.compile(
    rf"^#+ .*(?:\b(?:first|second|third|{WORK_ORDINAL})[ -](?:session|sitting)\b|\bsession \d+\b)",
    re.IGNORECASE | re.MULTILINE,
)


def load_cli_page_maker() -> Any:
    spec = importlib.util.spec_from_file_location("make_cli_md", DOCS / "make_cli_md.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()


def doc_pages() -> list[Path]:
    return [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def fenced_lines(text: str) -> list[str]:
    """The lines inside ``` blocks."""
    return [
        line
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
        for line in block.splitlines()
    ]


def help_text(app: typer.Typer, args: list[str]) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def listed_commands(help_output: str) -> list[str]:
    """The names in the Commands panel of a rich `--help`."""
    panel = help_output.split("─ Commands ─", 1)
    if len(panel) == 1:
        return []
    return re.findall(r"^│ (\S+)\s", panel[1].split("╰", 1)[0], re.MULTILINE)


def help_pages(app: typer.Typer, args: list[str]) -> list[tuple[list[str], str]]:
    """`--help` of this command and of every command it lists, depth first."""
    text = help_text(app, args)
    pages = [(args, text)]
    for name in listed_commands(text):
        pages += help_pages(app, [*args, name])
    return pages


def test_the_command_reference_is_generated_from_the_current_commands() -> None:
    page = load_cli_page_maker().render()
    assert CLI_MD.read_text() == page, "docs/cli.md is stale: run .venv/bin/python docs/make_cli_md.py"


@pytest.mark.parametrize(("program", "app"), [("specedge", client_app), ("hub_server", hub_app)])
def test_every_command_and_option_that_help_lists_is_in_the_command_reference(program: str, app: typer.Typer) -> None:
    reference = CLI_MD.read_text()
    pages = help_pages(app, [])
    assert len(pages) > 5, "--help listed no commands: the panel's format changed"
    for args, text in pages:
        assert f"`{' '.join([program, *args])}`" in reference, f"{program} {' '.join(args)} is missing from docs/cli.md"
        options = set(re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", text.split("─ Options ─", 1)[-1]))
        missing = sorted(option for option in options if f"`{option}" not in reference)
        assert not missing, f"{program} {' '.join(args)} --help lists {missing}, docs/cli.md does not"


def test_every_benchmark_command_names_a_script_that_exists() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    scripts = [
        m
        for line in fenced_lines(text)
        for m in re.findall(r"(?:^|\s)((?:benchmarks|docs|tests)/[\w./-]+\.(?:py|sh))", line)
    ]
    assert scripts, "no fenced command in docs/benchmarks.md runs a script"
    missing = sorted({script for script in scripts if not (REPO / script).is_file()})
    assert not missing, f"docs/benchmarks.md runs scripts that do not exist: {missing}"


def test_the_data_files_the_figures_cite_exist() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    cited = set(re.findall(r"docs/bench/[\w.{},-]+\.\w+", text))
    expanded = {path for pattern in cited for path in expand_braces(pattern)}
    missing = sorted(path for path in expanded if not (REPO / path).is_file())
    assert not missing, f"docs/benchmarks.md cites data files that do not exist: {missing}"


def expand_braces(pattern: str) -> list[str]:
    """`gpu-{a,b}-{1,16}.json` -> its four names (as the shell would)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [name for choice in match.group(1).split(",") for name in expand_braces(head + choice + tail)]


def test_the_readme_fits_on_two_screens() -> None:
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines < 180, f"README.md has {lines} lines; move detail to a page under docs/"


def test_the_figures_page_stays_the_current_figures() -> None:
    lines = len((DOCS / "benchmarks.md").read_text().splitlines())
    assert lines < 400, f"docs/benchmarks.md has {lines} lines; keep the newest figure per question (history is in git)"


def test_the_readme_keeps_its_two_commands_at_the_top() -> None:
    top = (REPO / "README.md").read_text().split("```sh\n", 1)[1].split("```", 1)[0]
    assert top.splitlines()[0].startswith("make demo") and top.splitlines()[1].startswith("make test")


def test_the_readme_links_the_pages_by_reader() -> None:
    readme = (REPO / "README.md").read_text()
    for page in (
        "chat.md",
        "cli.md",
        "operators.md",
        "api.md",
        "protocol.md",
        "architecture.md",
        "scaling.md",
        "benchmarks.md",
    ):
        assert f"docs/{page}" in readme, f"README.md does not link docs/{page}"
        assert (DOCS / page).is_file()


def test_no_doc_names_a_sitting_of_work_or_an_issue() -> None:
    found = [
        f"{page.relative_to(REPO)}:{number}: {line.strip()}"
        for page in doc_pages()
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if WORK_SESSION.search(line) or ISSUE_NUMBER.search(line)
    ]
    assert not found, "name the thing, not the sitting of work or the issue that made it:\n" + "\n".join(found)


def test_no_heading_in_the_repository_names_a_sitting_of_work() -> None:
    found = [
        f"{path}: {match.group(0)}"
        for path in tracked_files()
        if path.endswith(".md") and (REPO / path).is_file()
        for match in HEADING_SESSION.finditer((REPO / path).read_text())
    ]
    assert not found, "\n".join(found)


def test_no_file_in_the_repository_is_named_after_a_sitting_of_work() -> None:
    found = [
        path
        for path in tracked_files()
        if RUN_NUMBERED_FILE.search(path) or WORK_SESSION.search(path.replace("-", " "))
    ]
    assert not found, f"name each file for what it holds: {found}"


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        ("### A heading (ninth session)", True),
        ("measured in the 13th session", True),
        ("Thirteenth sitting", True),
        ("a user's second session is placed like the first", False),
        ("this session's KV blocks", False),
        ("64 sessions for 10 minutes", False),
    ],
)
def test_the_work_session_pattern_spares_the_products_sessions(text: str, flagged: bool) -> None:
    assert bool(WORK_SESSION.search(text)) is flagged


@pytest.mark.parametrize(
    ("path", "flagged"),
    [
        ("docs/bench/verify-speed-dispatch-cpu-12c.txt", True),
        ("docs/bench/verify-speed-gemma-cpu-13-before.txt", True),
        ("docs/bench/gpu-gemma-fp32-16.json", False),
        ("docs/bench/workers-cpu-1-2.json", False),
        ("tests/test_session_budget.py", False),
    ],
)
def test_the_run_numbered_file_pattern_spares_names_that_count_things(path: str, flagged: bool) -> None:
    assert bool(RUN_NUMBERED_FILE.search(path)) is flagged


@pytest.mark.parametrize(
    ("heading", "flagged"),
    [
        ("## On a GPU, second session: both pairs, 1 / 16 / 64 clients (H100, float32)", True),
        ("### The dispatch-bound target: the kernel's tiles (2026-12-04, thirteenth session)", True),
        ("## Session 12: the pool kernel", True),
        ("## Sessions, turns and KV blocks", False),
        ("### A session's first verify carries its prompt", False),
    ],
)
def test_the_heading_pattern_flags_sittings_not_sessions(heading: str, flagged: bool) -> None:
    assert bool(HEADING_SESSION.search(heading)) is flagged
