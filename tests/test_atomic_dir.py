"""A local folder replaced whole (``reclip_ray/atomic_dir.py``: exports, ``storage.upload_dir``): a reader in another
process never finds it missing or half written while it is replaced again and again, and a writer SIGKILLed while
it fills its staging folder leaves nothing behind once the next write to the same folder runs, while a live
writer's staging folder is never touched. Real processes, as a restarted rank 0 and a ``reclip-ray export`` are."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from reclip_ray import atomic_dir, storage
from reclip_ray.folders import write_folder_atomic

REPO = Path(__file__).resolve().parents[1]

# Reads TARGET/a and TARGET/b (each a version number written 4,096 times) in a loop until STOP exists, as a loader
# opens an export's files by path; prints how many reads found a file missing, how many found one short or mixed,
# and the reads. (A and b may come from two versions: a folder swap never promised more.)
READER = textwrap.dedent("""
    import os, sys
    target, stop = sys.argv[1], sys.argv[2]
    missing = short = reads = 0
    while not os.path.exists(stop):
        reads += 1
        for name in ("a", "b"):
            try:
                with open(os.path.join(target, name)) as f:
                    text = f.read()
            except FileNotFoundError:
                missing += 1
                continue
            version = text.split(",", 1)[0]
            short += text != ",".join([version] * 4096)
    print(missing, short, reads)
""")

# replace_dir(TARGET) whose write makes a 1 MB file, says so (prints the staging folder) and then waits forever.
STUCK_WRITER = textwrap.dedent("""
    import sys, time
    from reclip_ray import atomic_dir
    def write(staging):
        with open(staging + "/model.safetensors", "wb") as f:
            f.write(b"x" * (1 << 20))
        print(staging, flush=True)
        time.sleep(600)
    atomic_dir.replace_dir(sys.argv[1], write)
""")


def _write_version(version: int):
    def write(staging: str) -> None:
        for name in ("a", "b"):
            with open(os.path.join(staging, name), "w") as f:
                f.write(",".join([str(version)] * 4096))
    return write


def test_a_reader_never_finds_the_folder_missing_or_half_written_while_it_is_replaced(tmp_path):
    target = str(tmp_path / "model")
    atomic_dir.replace_dir(target, _write_version(0))
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, target, str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)  # the reader's interpreter is up and reading
        for version in range(1, 401):
            atomic_dir.replace_dir(target, _write_version(version))
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    missing, short, reads = map(int, out.split())
    assert reads > 1000  # it read throughout
    assert (missing, short) == (0, 0)
    assert (Path(target) / "a").read_text().split(",")[0] == "400"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stop"]  # no staging or old folder left


def test_the_new_folder_has_the_umasks_mode_like_any_folder_the_user_makes(tmp_path):
    """An export read by the user's group (a shared run folder) must not come out 0700, as a temp folder does."""
    for umask in (0o022, 0o002):
        old = os.umask(umask)
        try:
            atomic_dir.replace_dir(str(tmp_path / "model"), _write_version(umask))
        finally:
            os.umask(old)
        assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask


def test_the_fallback_without_renameat2_replaces_the_folder_too(tmp_path, monkeypatch):
    """Where the exchange is refused (not Linux, or a filesystem without it) the two renames still replace the
    folder whole and leave nothing beside it."""
    target = str(tmp_path / "model")
    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)
    for version in range(3):
        atomic_dir.replace_dir(target, _write_version(version))
    assert (Path(target) / "b").read_text().split(",")[0] == "2"
    assert os.listdir(tmp_path) == ["model"]


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux's")
def test_exchange_swaps_two_folders_in_one_rename(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("in a")
    (b / "y").write_text("in b")
    if not atomic_dir.exchange(str(a), str(b)):
        pytest.fail("renameat2(RENAME_EXCHANGE) refused on this Linux filesystem: replace_dir falls back to two "
                    "renames")
    assert os.listdir(a) == ["y"] and os.listdir(b) == ["x"]
    assert atomic_dir.exchange(str(a), str(tmp_path / "absent")) is False


def test_a_failed_write_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "model"
    atomic_dir.replace_dir(str(target), _write_version(1))

    def fail(staging: str) -> None:
        _write_version(2)(staging)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder_atomic(target, lambda p: fail(str(p)), replaces=("a", "b"))  # an earlier folder of its kind
    assert (target / "a").read_text().split(",")[0] == "1"
    assert os.listdir(tmp_path) == ["model"]


def _stuck_writer(target: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, target], stdout=subprocess.PIPE, text=True,
                            env=env)
    staging = proc.stdout.readline().strip()  # written 1 MB, now waits
    assert os.path.isfile(os.path.join(staging, "model.safetensors")), staging
    return proc, staging


def test_a_killed_writers_staging_folder_goes_at_the_next_write_and_a_live_writers_stays(tmp_path):
    target = str(tmp_path / "run" / "model")
    storage.upload_dir(str(_make_source(tmp_path / "v1")), target)
    killed, killed_staging = _stuck_writer(target)
    alive, alive_staging = _stuck_writer(target)
    parent = os.path.dirname(target)
    # Left by earlier versions (no lock): their staging and old folders, under the names they used.
    legacy = [os.path.join(parent, n) for n in (".model.tmp-k3j2_x1", ".model.old-4242", "model.tmp-4242-0123abcd",
                                                "model.old-4242-89abcdef")]
    keep = [os.path.join(parent, n) for n in ("model2", ".model2.tmp-abc", "notes.model.tmp-x")]
    for folder in legacy + keep:
        os.makedirs(folder)
    try:
        killed.send_signal(signal.SIGKILL)  # mid-write: no finally, no atexit
        killed.wait(timeout=30)
        assert os.path.isdir(killed_staging)

        storage.upload_dir(str(_make_source(tmp_path / "v2")), target)  # the next write to the same folder

        assert not os.path.exists(killed_staging)
        assert not any(os.path.exists(f) for f in legacy)
        assert os.path.isfile(os.path.join(alive_staging, "model.safetensors"))  # its writer holds its lock
        assert all(os.path.isdir(f) for f in keep)  # other folders' names
        assert (Path(target) / "weights").read_text() == "v2"
        assert atomic_dir.remove_dead_staging(parent, "model") == []  # however often it runs
    finally:
        alive.kill()
        alive.wait(timeout=30)
    assert atomic_dir.remove_dead_staging(parent, "model") == [alive_staging]  # once its writer is gone
    assert sorted(os.listdir(parent)) == sorted(["model"] + [os.path.basename(f) for f in keep])


def _make_source(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "weights").write_text(folder.name)
    return folder
