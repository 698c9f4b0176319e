"""`specedge models`: the draft models on this machine (list, pull, rm, path)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from specedge_cli import paths
from specedge_cli.errors import ModelFileError
from specedge_cli.models import (
    DEFAULT_MODEL,
    PRESETS,
    Preset,
    hf_file_preset,
    local_state,
    preset_path,
    pull_hf_file,
    register_model,
    registered_models,
    remove_preset_files,
    resolve_model,
    unregister_model,
)

app = typer.Typer(help="Draft models: list, pull, rm, path.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)

Offline = Annotated[bool, typer.Option("--offline", help="Never download; only check what is on disk.")]


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelFileError(f"unknown model {name!r}; `specedge models list` shows the presets") from None


@app.command("list")
def list_models() -> None:
    """The presets, which target family each fits, and whether it is on disk."""
    table = Table(box=None, pad_edge=False)
    for column in ("name", "fits", "size", "state", "file"):
        table.add_column(column)
    models_dir = paths.models_dir()
    for preset in PRESETS.values():
        name = preset.name + (" (default)" if preset.name == DEFAULT_MODEL else "")
        table.add_row(
            name,
            preset.target_family,
            f"{preset.size / 1e6:.0f} MB",
            local_state(preset, models_dir),
            str(preset_path(preset, models_dir)),
        )
    for name, path in registered_models(models_dir).items():
        size = f"{path.stat().st_size / 1e6:.0f} MB" if path.is_file() else "-"
        table.add_row(name, "?", size, "local" if path.is_file() else "missing", str(path))
    out.print(table)


@app.command()
def pull(
    name: Annotated[
        str,
        typer.Argument(
            help="A preset name (`specedge models list`), a local .gguf file to register, "
            "or OWNER/REPO/FILE.gguf@SHA256 on the Hugging Face Hub (as a hub names its draft)."
        ),
    ],
    as_name: Annotated[
        str | None,
        typer.Option(
            "--name", help="With a file: the name to use it by (a preset's own, if it is that preset's file)."
        ),
    ] = None,
    offline: Offline = False,
) -> None:
    """Fetch a preset or a Hugging Face file (resuming a partial download, checking its sha256), or register a local file."""
    hf_file = hf_file_preset(name)
    if hf_file is not None:
        path = pull_hf_file(hf_file, paths.models_dir(), offline)
        out.print(f"{hf_file.name} is ready: {path}; use it with `specedge chat --model {hf_file.name}`")
        return
    if name.endswith(".gguf") or Path(name).is_file():
        local = Path(name).expanduser()
        register_model(as_name or local.stem, local, paths.models_dir())
        out.print(
            f"{as_name or local.stem} is {local.resolve()}; use it with `specedge chat --model {as_name or local.stem}`"
        )
        return
    resolved = resolve_model(_preset(name).name, paths.models_dir(), offline=offline)
    out.print(f"{name} is ready: {resolved.path}")


@app.command()
def rm(name: Annotated[str, typer.Argument(help="A preset name, or a registered file's name.")]) -> None:
    """Delete a preset's file (and any partial download); forget a registered file (kept on disk)."""
    if unregister_model(name, paths.models_dir()):
        out.print(f"forgot {name} (the file itself is kept)")
        return
    removed = remove_preset_files(_preset(name), paths.models_dir())
    out.print(f"removed {len(removed)} file(s) of {name}" if removed else f"{name} has no files here")


@app.command()
def path(name: Annotated[str | None, typer.Argument(help="A preset name; default: the models folder.")] = None) -> None:
    """Where models are kept, or where one preset's file is."""
    models_dir = paths.models_dir()
    if name in registered_models(models_dir):
        print(registered_models(models_dir)[name])
        return
    print(preset_path(_preset(name), models_dir) if name else models_dir)
