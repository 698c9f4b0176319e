"""The draft a command takes when the user named none: with a hub, one whose vocabulary is its target's.

A hub refuses a session (409) whose draft vocabulary differs from its target's, so `specedge chat`,
`serve` and `doctor` without a model named (by --model, SPECEDGE_MODEL or `config set model`) do not
take the default blindly: they take it if it fits the hub, else a model here that does (the one
the hub names with --draft-hint first), else they say which one to pull.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from specedge_cli import paths, settings
from specedge_cli.errors import ModelFileError
from specedge_cli.models import DEFAULT_MODEL, PRESETS, ResolvedModel, installed_models, resolve_model
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient


def named_model(flag: str | None) -> str | None:
    """The model the user named: the flag, then SPECEDGE_MODEL or the config file; None for the default."""
    if flag:
        return flag
    value, source = settings.lookup("model")
    return None if source == "default" else value


def choose_draft(
    flag: str | None, address: settings.HubAddress, insecure: bool, offline: bool, console: Console
) -> ResolvedModel:
    """The draft of a chat or a server: the one named; else the default, or with a hub one that fits it."""
    named = named_model(flag)
    if named or not address.url:
        return resolve_model(named or DEFAULT_MODEL, paths.models_dir(), offline=offline)
    info = hub_info(address.url, address.token, insecure or address.insecure, console)
    name = draft_for_hub(info, address.url)
    if name != DEFAULT_MODEL:
        console.print(
            f"[dim]Drafting with {name}: it shares the vocabulary of the hub's target {info.model}, which the "
            f"default {DEFAULT_MODEL} does not (--model picks another).[/dim]"
        )
    return resolve_model(name, paths.models_dir(), offline=offline)


def hub_info(url: str, token: str | None, insecure: bool, console: Console) -> wire.HubInfo:
    """The hub's /v1/info, once it is up and has loaded its target (saying so while waiting)."""
    from specedge_cli.waiting import wait_for_remote  # waiting imports the embedded hub's launcher

    with HubClient(url, token, insecure=insecure) as client:
        wait_for_remote(client, console)
        return client.info()


def draft_for_hub(info: wire.HubInfo, hub_url: str) -> str:
    """The name of a model here that fits the hub, or an error that says which one to pull."""
    name = fitting_model(info)
    if name is None:
        raise ModelFileError(nothing_fits(info, hub_url))
    return name


def fitting_model(info: wire.HubInfo) -> str | None:
    """A model here whose vocabulary is the hub target's: the default first, then the hub's hint, then the rest."""
    models_dir = paths.models_dir()
    installed = installed_models(models_dir)
    hinted = [hint_name(info.draft_hint)] if info.draft_hint else []
    for name in dict.fromkeys([DEFAULT_MODEL, *hinted, *installed]):
        if name in installed and fingerprint_of(name, installed[name], models_dir) == info.vocab_fingerprint:
            return name
    return None


def nothing_fits(info: wire.HubInfo, hub_url: str) -> str:
    """What to do when no model here shares the hub target's vocabulary."""
    lead = (
        f"the hub at {hub_url} verifies with {info.model}, whose vocabulary no draft model here shares "
        f"(not the default {DEFAULT_MODEL} either)"
    )
    if info.draft_hint:
        return f"{lead}; fetch the draft the hub names: `{pull_command(info.draft_hint)}`, then run again"
    preset = suggested_preset(info)
    if preset:
        return f"{lead}; fetch a draft made for it: `specedge models pull {preset}`, then run again"
    return f"{lead}; register a draft made for it: `specedge models pull PATH.gguf --name NAME`, then run again"


def suggested_preset(info: wire.HubInfo) -> str | None:
    """A preset for the hub's target: by its measured vocabulary, else by the target's family name."""
    for preset in PRESETS.values():
        if preset.vocab_fingerprint == info.vocab_fingerprint:
            return preset.name
    target = _squash(info.model)
    family = [preset for preset in PRESETS.values() if _squash(preset.target_family) in target]
    return min(family, key=lambda preset: preset.size).name if family else None


def _squash(name: str) -> str:
    """gemma-3-270m and gemma3 alike: lower case without separators."""
    return "".join(c for c in name.lower() if c not in "-_ .")


def hint_name(hint: wire.DraftHint) -> str:
    """The name the hub's hint goes by here: the preset's, or the Hugging Face file's stem."""
    return hint.preset or Path(hint.hf_file).stem


def pull_command(hint: wire.DraftHint) -> str:
    """The command that fetches the draft a hub names."""
    if hint.preset:
        return f"specedge models pull {hint.preset}"
    return f"specedge models pull {hint.hf_repo}/{hint.hf_file}@{hint.sha256}"


# --- vocabulary fingerprints of the files here, kept beside them ------------------------------
def fingerprint_of(name: str, path: Path, models_dir: Path) -> str | None:
    """The vocabulary fingerprint of model `name` at `path`; None when llama.cpp cannot read it."""
    preset = PRESETS.get(name)
    if preset and preset.vocab_fingerprint:  # measured once: no need to read (or assemble) the file
        return preset.vocab_fingerprint
    try:
        return _cached_fingerprint(path.resolve(), models_dir / "vocabularies.json")
    except (ModelFileError, OSError):
        return None


def _cached_fingerprint(path: Path, cache: Path) -> str:
    """Reading a vocabulary takes seconds for a large one: keep each file's, keyed by its size and mtime."""
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path)) if isinstance(known, dict) else None
    if isinstance(entry, list) and entry[:2] == stamp:
        return str(entry[2])
    from specedge_cli.drafting.vocabulary import Vocabulary  # llama.cpp: only when a file is read

    fingerprint = Vocabulary.load(path).fingerprint()
    known = {**(known if isinstance(known, dict) else {}), str(path): [*stamp, fingerprint]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_suffix(".tmp")
    staging.write_text(json.dumps(known))
    staging.replace(cache)
    return fingerprint
