"""A remote folder replaced while it is read (``reclip_ray/folders.py``): ``reclip-ray eval RUN_DIR/model`` while
the run exports again gets the old model or the new one, never a mix, and a folder left half-written is named.

On S3 (moto's server). The stand-in "weights" of the versions have the same size, as a model's weights do from
export to export, so that a check of sizes alone would pass a mix."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time

import pytest

from reclip_ray import folders, storage
from reclip_ray.errors import CheckpointError

SIZE = 3000


def _version(root, tag: str, extra: str | None = None) -> str:
    """A local folder: weights.bin (same size in every version), sub/config.txt, and an optional extra file."""
    for name, data in {"weights.bin": (tag.encode() * SIZE)[:SIZE], "sub/config.txt": f"version {tag}".encode(),
                       **({extra: tag.encode()} if extra else {})}.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return str(root)


def _files(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, and every folder (an empty one too) as None."""
    out: dict[str, bytes | None] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(folder, name), root) + "/"] = None
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


@pytest.fixture
def target(s3_prefix) -> str:
    return storage.join(s3_prefix, "model")


def test_a_remote_folder_is_replaced_with_a_manifest_and_read_back_exactly(tmp_path, target):
    v1 = _version(tmp_path / "v1", "a", extra="old/only-in-v1.txt")
    v2 = _version(tmp_path / "v2", "b", extra="only-in-v2.txt")
    folders.upload_folder(v1, target)
    folders.upload_folder(v2, target)

    names = sorted(u[len(target) + 1:] for u in storage.list_files(target))
    assert names == [folders.MANIFEST, "only-in-v2.txt", "sub/config.txt", "weights.bin"]  # v1's extra is gone
    assert not storage.exists(storage.join(target, "old"))  # and its folder: S3 keeps a marker where a file was
    manifest = storage.read_json(storage.join(target, folders.MANIFEST))
    assert manifest == {"files": {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                  for name, data in _files(v2).items() if data is not None}}
    back = folders.download_folder(target, str(tmp_path / "back"))
    assert _files(back) == _files(v2)  # the manifest is not part of the copy


def _spy_copies(monkeypatch, then=lambda: None) -> list[list[str] | None]:
    """The files each ``copy_to_local`` call of the reader copied (None: the whole folder); ``then()`` after each."""
    real, copied = storage.copy_to_local, []

    def copy_to_local(*args, only=None, **kwargs):
        real(*args, only=only, **kwargs)
        copied.append(None if only is None else sorted(only))
        then()

    monkeypatch.setattr(storage, "copy_to_local", copy_to_local)
    return copied


def test_a_reader_during_a_replacement_waits_for_the_new_folder_whole(tmp_path, target, monkeypatch):
    """The writer is caught between its manifest and its last file: v2's manifest and weights are up, v1's config is
    still there (the same size as v2's). The reader's first copy takes that mix, finds the config does not match,
    and reads the config alone again once it changes."""
    v1 = _version(tmp_path / "v1", "a")
    v2 = _version(tmp_path / "v2", "b")
    folders.upload_folder(v1, target)
    real_upload = storage.upload_dir
    half_written, first_copy_done = threading.Event(), threading.Event()

    def upload_in_two_halves(local_dir, remote, keep=()):
        with open(os.path.join(local_dir, "weights.bin"), "rb") as f:
            storage.write_bytes(storage.join(remote, "weights.bin"), f.read())
        half_written.set()
        first_copy_done.wait(30)
        real_upload(local_dir, remote, keep)

    copied = _spy_copies(monkeypatch, then=first_copy_done.set)
    monkeypatch.setattr(storage, "upload_dir", upload_in_two_halves)
    writer = threading.Thread(target=folders.upload_folder, args=(v2, target))
    writer.start()
    assert half_written.wait(30)
    back = folders.download_folder(target, str(tmp_path / "back"))
    writer.join()
    assert _files(back) == _files(v2)
    assert copied[0] == ["sub/config.txt", "weights.bin"] and copied[1:] == [["sub/config.txt"]]


def test_a_reader_that_took_the_old_manifest_reads_the_new_one(tmp_path, target, monkeypatch):
    """The whole folder is replaced between the reader's read of the manifest and its copy of the files."""
    v1 = _version(tmp_path / "v1", "a")
    v2 = _version(tmp_path / "v2", "b")
    folders.upload_folder(v1, target)
    real_manifest, calls = folders._manifest, []

    def manifest_then_replaced(source):
        files = real_manifest(source)
        if not calls:
            folders.upload_folder(v2, target)
        calls.append(files)
        return files

    monkeypatch.setattr(folders, "_manifest", manifest_then_replaced)
    assert _files(folders.download_folder(target, str(tmp_path / "back"))) == _files(v2)
    assert calls[0] != calls[-1]


def test_a_slow_live_writer_is_waited_for_as_long_as_it_makes_progress(tmp_path, target, monkeypatch):
    """A file every 0.6 s after the manifest, 1.8 s in all, against a wait of 1 s without change."""
    v1 = _version(tmp_path / "v1", "a", extra="c.txt")
    v2 = _version(tmp_path / "v2", "b", extra="c.txt")
    folders.upload_folder(v1, target)
    real_upload = storage.upload_dir

    def slow_upload(local_dir, remote, keep=()):
        for name in ("weights.bin", "sub/config.txt", "c.txt"):
            time.sleep(0.6)
            with open(os.path.join(local_dir, name), "rb") as f:
                storage.write_bytes(storage.join(remote, name), f.read())
        real_upload(local_dir, remote, keep)

    monkeypatch.setattr(storage, "upload_dir", slow_upload)
    monkeypatch.setattr(folders, "WHOLE_WAIT_S", 1.0)
    writer = threading.Thread(target=folders.upload_folder, args=(v2, target))
    writer.start()
    new_config = hashlib.sha256(b"version b").hexdigest()
    while new_config not in storage.read_bytes(storage.join(target, folders.MANIFEST)).decode():  # v2's is up
        time.sleep(0.01)
    back = folders.download_folder(target, str(tmp_path / "back"))
    writer.join()
    assert _files(back) == _files(v2)


def test_the_wait_before_copying_an_unchanged_file_again_counts_from_the_copys_end(tmp_path, target, monkeypatch):
    """A copy slower than ``RECOPY_S`` (a 600 MB file over a slow link) is not made again at the very next look:
    the file has not changed, and the wait counts from when the copy ended, not from when it began."""
    folders.upload_folder(_version(tmp_path / "v1", "a"), target)
    storage.write_bytes(storage.join(target, "sub", "config.txt"), b"version c")  # the size the manifest says
    monkeypatch.setattr(folders, "WHOLE_WAIT_S", 0.3)
    assert folders.RECOPY_S[0] == 1.0
    copied = _spy_copies(monkeypatch, then=lambda: time.sleep(1.2))  # each copy takes longer than RECOPY_S
    with pytest.raises(CheckpointError, match="does not match the folder's manifest"):
        folders.download_folder(target, str(tmp_path / "back"))
    assert copied == [["sub/config.txt", "weights.bin"]]


def test_a_folder_left_half_written_is_named_in_one_line_after_one_copy(tmp_path, target, monkeypatch, capsys):
    """A writer that died between its manifest and its last file leaves a file that is not the manifest's (here
    the same size, other bytes). The reader copies it once (it does not change), waits ``WHOLE_WAIT_S`` without a
    change, then names the file; the CLI says so in one line."""
    from reclip_ray.cli import main

    folders.upload_folder(_version(tmp_path / "v1", "a"), target)
    storage.write_bytes(storage.join(target, "sub", "config.txt"), b"version c")  # the size the manifest says
    monkeypatch.setattr(folders, "WHOLE_WAIT_S", 0.5)
    # Copied again only after RECOPY_S, counted from the copy's end: here longer than the whole wait, whatever the
    # load on the machine (with 1 s counted from the copy's start, a copy slowed past 0.5 s was made twice)
    monkeypatch.setattr(folders, "RECOPY_S", (5.0, 30.0))
    copied = _spy_copies(monkeypatch)
    with pytest.raises(CheckpointError, match=rf"^{target}/sub/config.txt does not match the folder's manifest"):
        folders.download_folder(target, str(tmp_path / "back"))
    assert copied == [["sub/config.txt", "weights.bin"]]  # not again and again: the object did not change
    assert main(["eval", "--checkpoint", target, "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{target}/sub/config.txt does not match" in err

    storage.delete_file(storage.join(target, folders.MANIFEST))  # what the message offers: read it as it is
    assert _files(folders.download_folder(target, str(tmp_path / "as-is")))["sub/config.txt"] == b"version c"


def test_a_file_the_manifest_names_and_the_folder_lacks_is_named(tmp_path, target, monkeypatch):
    folders.upload_folder(_version(tmp_path / "v1", "a"), target)
    storage.delete_file(storage.join(target, "weights.bin"))
    monkeypatch.setattr(folders, "WHOLE_WAIT_S", 0.3)
    with pytest.raises(CheckpointError, match=rf"^{target}/weights.bin does not match"):
        folders.download_folder(target, str(tmp_path / "back"))


def test_an_error_writing_the_local_copy_is_raised_at_once(tmp_path, target, monkeypatch):
    """A full disk here is not a folder being written there: no wait, and the disk's error, not the manifest's."""
    folders.upload_folder(_version(tmp_path / "v1", "a"), target)

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "pwrite", full)
    start = time.monotonic()
    with pytest.raises(OSError, match="No space left"):
        folders.download_folder(target, str(tmp_path / "back"))
    assert time.monotonic() - start < folders.WHOLE_WAIT_S / 10


def test_a_remote_folder_without_a_manifest_is_read_as_it_is(tmp_path, s3_prefix):
    """Folders copied to the bucket by other tools (``aws s3 sync`` of an open_clip folder) have none."""
    v1 = _version(tmp_path / "v1", "a", extra="x.txt")
    target = storage.join(s3_prefix, "plain")
    storage.upload_dir(v1, target)
    assert not storage.exists(storage.join(target, folders.MANIFEST))
    assert _files(folders.download_folder(target, str(tmp_path / "back"))) == _files(v1)


NOT_PLAIN = "a file name that is not a plain relative path"


@pytest.mark.parametrize("manifest, says", [
    (b"{not json", "not a folder manifest"),
    (json.dumps({"files": ["weights.bin"]}).encode(), "not a folder manifest"),
    *[(json.dumps({"files": {name: {"bytes": 1, "sha256": "0"}}}).encode(), NOT_PLAIN)
      for name in ("../../victim.txt", "/tmp/victim.txt", "./weights.bin")],
])
def test_a_manifest_that_is_not_one_is_refused_in_one_line(tmp_path, target, manifest, says):
    """Its names are paths the reader writes and removes in its local copy: none may leave it."""
    folders.upload_folder(_version(tmp_path / "v1", "a"), target)
    storage.write_bytes(storage.join(target, folders.MANIFEST), manifest)
    with pytest.raises(CheckpointError, match=rf"\.reclip-folder\.json: {says}") as raised:
        folders.download_folder(target, str(tmp_path / "deep" / "back"))
    assert "\n" not in str(raised.value)


def test_a_remote_file_is_copied_to_disk_in_parts_not_held_whole_in_memory(tmp_path, s3_prefix):
    """``model.init_from: s3://.../open_clip_model.safetensors`` (1.7 GB for a ViT-L) is read through ``local_copy``,
    in every worker at once. It was read whole into memory and then written: twice the file at peak (read_bytes'
    buffer and the bytes made of it). Now its parts go to disk as they come: ``COPY_THREADS`` parts at most. Peak
    RSS growth of a fresh process (VmHWM: the S3 server's memory is this process's, not the child's)."""
    from child import run_python

    size = 64 << 20
    data = os.urandom(1 << 20) * (size >> 20)
    storage.write_bytes(f"{s3_prefix}/w.safetensors", data)
    want = hashlib.sha256(data).hexdigest()
    del data
    script = (
        "import hashlib, os, sys\n"
        "from reclip_ray import folders, storage\n"
        "storage.PART_BYTES, storage.COPY_THREADS = 4 << 20, 4  # 16 MB in flight at most\n"
        "storage.read_json(sys.argv[1] + '/absent.json')  # the S3 client made before the baseline\n"
        "before = hwm()\n"
        "with folders.local_copy(sys.argv[1] + '/w.safetensors') as local:\n"
        "    grew = hwm() - before\n"
        "    digest = hashlib.sha256(open(local, 'rb').read()).hexdigest()\n"
        "print(grew, os.path.basename(local), digest)\n")
    done = run_python(script, s3_prefix, timeout=120, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    grew, name, digest = done.stdout.split()
    assert (name, digest) == ("w.safetensors", want)
    assert int(grew) < size // 2, f"peak RSS grew {int(grew) >> 20} MB copying a {size >> 20} MB file"


def test_a_copy_that_a_killed_process_left_is_removed_by_the_next_sweep(tmp_path, s3_prefix):
    """A worker killed while it downloads (or loads) its ``model.init_from`` copy, or an eval killed for memory,
    cannot remove its temp folder: in $TMPDIR itself it stayed for good (1.7 GB for a ViT-L checkpoint each time).
    It is made in the process's scratch folder, which the next training worker on the node removes
    (``scratch.remove_orphans``)."""
    import glob
    import signal
    import subprocess
    import sys

    from conftest import S3_RANGE_LATENCY_S

    storage.write_bytes(f"{s3_prefix}/w.safetensors", os.urandom(1 << 20))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = f"from reclip_ray.init_weights import read_state; read_state({s3_prefix + '/w.safetensors'!r})"
    S3_RANGE_LATENCY_S[0] = 30.0  # the GET waits: the process is killed while it holds the copy's folder
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(f"{tmp}/**/reclip-download-*", recursive=True) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        S3_RANGE_LATENCY_S[0] = 0.0
        if proc.poll() is None:
            proc.kill()
    assert glob.glob(f"{tmp}/**/reclip-download-*", recursive=True)
    sweep = "from reclip_ray.train import scratch; print(len(scratch.remove_orphans()))"
    done = subprocess.run([sys.executable, "-c", sweep], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
    assert glob.glob(f"{tmp}/**/reclip-download-*", recursive=True) == []
