"""The footer cache on disk: a launch on data an earlier process listed reads only the footers that changed.

At 140k shards on S3 every launch (a resume, a rerun, each sweep trial) read every footer again: 140k ranged GETs
before any worker started. No Ray: the tests list and read footers in this process and in subprocesses.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reclip_ray import storage
from reclip_ray.data import shards

REPO = Path(__file__).resolve().parents[1]
LABELS = json.dumps({"info": {"features": {"label": {"_type": "ClassLabel", "names": ["cat", "dog", "emu"]}}}})


def write_dataset(root: Path, count: int = 6) -> list[str]:
    """Shards whose footers hold everything a ``Footer`` keeps: several row groups, null images, three schemas
    (one with a vouched-for copy column), the ``reclip.copies`` entry and Hugging Face ClassLabels."""
    out = []
    for i in range(count):
        folder = root / f"part{i // 3}"  # nested; listing order = shard order
        folder.mkdir(parents=True, exist_ok=True)
        n = 3 + i
        columns = {"key": [f"{i}-{r}" for r in range(n)],
                   "image": pa.array([None if r % 3 == 0 else b"jpeg" for r in range(n)], pa.binary()),
                   "caption": [f"caption {r}" for r in range(n)],
                   "label": pa.array([r % 3 for r in range(n)], pa.int32())}
        meta = {b"huggingface": LABELS.encode()}
        if i == 1:
            columns["image_40"] = pa.array([b"small"] * n, pa.binary())
            meta[shards.COPIES_KEY] = json.dumps({"column": "image", "rows": n, "sizes": [40]}).encode()
        if i >= 4:
            columns["width"] = pa.array([40] * n, pa.int32())
        table = pa.table(columns).replace_schema_metadata(meta)
        path = folder / f"{i:03d}.parquet"
        pq.write_table(table, path, row_group_size=2)
        out.append(str(path))
    return sorted(out)


def rewrite(path: str, rows: int) -> None:
    """A shard replaced as shard writers do (temp file + rename): another size, another mtime."""
    pq.write_table(pa.table({"key": [str(r) for r in range(rows)], "image": pa.array([b"x"] * rows),
                             "caption": ["c"] * rows, "label": pa.array([0] * rows, pa.int32())}), path + ".tmp")
    os.replace(path + ".tmp", path)


def launch(*paths: str) -> tuple[list[shards.Footer], int]:
    """What a new driver process does (this process's footer memory cleared): list, read the footers.
    Returns (footers, footers read from storage)."""
    shards.clear_footer_cache()
    before = shards.FOOTER_READS[0]
    got = [f for p in paths for f in shards.footers(shards.list_parquet_files(p))]
    return got, shards.FOOTER_READS[0] - before


def cached_paths(listing: str) -> list[str]:
    """The shard paths a listing's cache file holds."""
    with pa.OSFile(shards.footer_cache_file(storage.normalize(listing))) as f:
        return pa.ipc.open_file(f).read_all().column("path").to_pylist()


CHILD = r"""
import json, pickle, sys
import pyarrow.parquet as pq
from reclip_ray.data import shards

opens = [0]
real = pq.ParquetFile.__init__

def counting(self, *a, **k):
    opens[0] += 1
    real(self, *a, **k)

pq.ParquetFile.__init__ = counting
got = [f for p in json.loads(sys.argv[1]) for f in shards.footers(shards.list_parquet_files(p))]
labels = {id(f.class_labels) for f in got if f.class_labels}
sys.stdout.buffer.write(pickle.dumps({"footers": got, "reads": shards.FOOTER_READS[0], "opens": opens[0],
                                      "schemas": len({id(f.schema) for f in got}), "labels": len(labels)}))
"""


def child(*paths: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths)], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return pickle.loads(done.stdout)


def test_a_second_process_reads_no_footer_and_gets_equal_footers(tmp_path):
    files = write_dataset(tmp_path / "d")
    single = files[1]
    assert launch(single)[1] == 1  # an eval set given as one file: a listing (and a cache file) of its own
    first, reads = launch(str(tmp_path / "d"))
    assert reads == len(files) and os.path.isfile(shards.footer_cache_file(str(tmp_path / "d")))
    first.append(first[1])
    assert [f.path for f in first] == files + [single]
    assert min(len(f.row_groups) for f in first) > 1 and first[1].shard().copies == (40,)
    assert all(f.class_labels == (("label", ("cat", "dog", "emu")),) for f in first)
    assert [dict(f.null_counts).get("image") for f in first[:3]] == [1, 2, 2]

    alone = child(single)
    assert (alone["reads"], alone["opens"], alone["footers"]) == (0, 0, [first[1]])
    again = child(str(tmp_path / "d"), single)
    assert (again["reads"], again["opens"]) == (0, 0)
    assert again["footers"] == first
    for a, b in zip(again["footers"], first, strict=True):
        assert a.schema.equals(b.schema, check_metadata=True) and a.reclip_metadata == b.reclip_metadata
        assert a.shard() == b.shard() and a.shard("image_40") == b.shard("image_40")
    # interned as a read interns them: one schema object per distinct schema, one ClassLabels tuple
    assert (again["schemas"], again["labels"]) == (3, 1)


def test_a_rewritten_shard_is_read_again_and_the_cache_updated(tmp_path, monkeypatch):
    files = write_dataset(tmp_path / "d")
    launch(str(tmp_path / "d"))
    rewrite(files[2], rows=11)
    reads = Counter()
    real = shards._footer
    monkeypatch.setattr(shards, "_footer", lambda f: (reads.update([f]), real(f))[1])
    got, _ = launch(str(tmp_path / "d"))
    assert reads == Counter({files[2]: 1}) and got[2].rows == 11
    assert got[2].schema is got[0].schema  # a shard read now shares the schema object loaded from the cache
    reads.clear()
    again, _ = launch(str(tmp_path / "d"))
    assert not reads and again == got
    stat = os.stat(files[3])  # the same size, another mtime: read again too
    os.utime(files[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert launch(str(tmp_path / "d"))[0] == got and reads == Counter({files[3]: 1})


def test_deleted_shards_drop_out_of_the_cache(tmp_path):
    files = write_dataset(tmp_path / "d")
    listing = str(tmp_path / "d")
    launch(listing)
    assert cached_paths(listing) == files
    os.remove(files[0])
    rewrite(files[1], rows=2)
    got, reads = launch(listing)
    assert reads == 1 and cached_paths(listing) == files[1:]
    os.remove(files[3])  # deleted, nothing rewritten: the next launch reads nothing, and drops it all the same
    got, reads = launch(listing)
    assert reads == 0 and [f.path for f in got] == files[1:3] + files[4:]
    assert cached_paths(listing) == files[1:3] + files[4:]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path, damage, caplog):
    files = write_dataset(tmp_path / "d")
    expected, _ = launch(str(tmp_path / "d"))
    cache = shards.footer_cache_file(str(tmp_path / "d"))
    data = Path(cache).read_bytes()
    Path(cache).write_bytes({"garbage": b"not arrow at all" * 10, "truncated": data[:len(data) // 2],
                             "empty": b""}[damage])
    with caplog.at_level("DEBUG", logger="reclip_ray.data.shards"):
        got, reads = launch(str(tmp_path / "d"))
    assert reads == len(files) and got == expected
    assert "footer cache" in caplog.text and "ignored" in caplog.text
    assert Path(cache).read_bytes() != b"" and launch(str(tmp_path / "d"))[1] == 0  # replaced by a whole one


def test_a_cache_of_another_listing_or_version_is_not_used(tmp_path, monkeypatch):
    """A cache file is read only for the listing and format it was written for (the name holds both; the file says
    them again, so a renamed or colliding file is not misread)."""
    files = write_dataset(tmp_path / "d")
    write_dataset(tmp_path / "e")
    launch(str(tmp_path / "d"))
    os.replace(shards.footer_cache_file(str(tmp_path / "d")), shards.footer_cache_file(str(tmp_path / "e")))
    assert launch(str(tmp_path / "e"))[1] == len(files)
    monkeypatch.setattr(shards, "FOOTER_CACHE_VERSION", shards.FOOTER_CACHE_VERSION + 1)
    assert launch(str(tmp_path / "e"))[1] == len(files)


def test_with_the_cache_off_every_launch_reads_every_footer(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLIP_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    files = write_dataset(tmp_path / "d")
    assert shards.cache_dir() is None and shards.footer_cache_file(str(tmp_path / "d")) is None
    assert launch(str(tmp_path / "d"))[1] == len(files)
    assert launch(str(tmp_path / "d"))[1] == len(files)
    assert child(str(tmp_path / "d"))["reads"] == len(files)
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_the_cache_folder_is_chosen_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("RECLIP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shards.cache_dir() == str(tmp_path / "xdg" / "reclip-ray")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shards.cache_dir() == str(tmp_path / "home" / ".cache" / "reclip-ray")
    monkeypatch.setenv("RECLIP_CACHE_DIR", str(tmp_path / "mine"))
    assert shards.footer_cache_file("s3://b/laion").startswith(str(tmp_path / "mine" / "footers") + "/")
    assert shards.footer_cache_file("s3://b/laion") != shards.footer_cache_file("s3://b/laion?region=x")
    assert shards.footer_cache_file(str(tmp_path / "d")) == shards.footer_cache_file(storage.normalize(
        f"file://{tmp_path}/d/"))


def test_an_unwritable_cache_folder_means_no_cache(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RECLIP_CACHE_DIR", str(blocker))
    files = write_dataset(tmp_path / "d")
    write_dataset(tmp_path / "e")
    with caplog.at_level("DEBUG", logger="reclip_ray.data.shards"):
        assert launch(str(tmp_path / "d"), str(tmp_path / "e"))[1] == 2 * len(files)
        shards.clear_footer_cache()
        assert launch(str(tmp_path / "d"))[1] == len(files)
    assert blocker.read_text() == "not a folder"
    assert caplog.text.count("footer cache not written") == 2  # once per process (here: per clear), not per listing


def test_two_writers_never_leave_a_broken_cache_file(tmp_path):
    """Launches writing one listing's cache at once: each replaces the file whole, a reader sees a whole one."""
    files = write_dataset(tmp_path / "d")
    listing = str(tmp_path / "d")
    launch(listing)
    errors = []

    def write():
        for _ in range(15):
            try:
                shards._save_footer_cache(storage.normalize(listing))
            except Exception as exc:  # pragma: no cover - the failure this test looks for
                errors.append(exc)

    writers = [threading.Thread(target=write) for _ in range(2)]
    for w in writers:
        w.start()
    seen = []
    while any(w.is_alive() for w in writers):
        seen.append(cached_paths(listing))
    for w in writers:
        w.join()
    assert not errors and seen and all(paths == files for paths in seen)
    folder = os.path.dirname(shards.footer_cache_file(listing))
    assert [n for n in os.listdir(folder) if ".tmp-" in n] == []  # no writer's temp file left behind


def test_a_second_launch_on_s3_sends_no_footer_get(tmp_path, s3_prefix, s3_requests):
    files = write_dataset(tmp_path / "d")
    remote = storage.join(s3_prefix, "d")
    storage.upload_dir(str(tmp_path / "d"), remote)
    s3_requests.clear()
    first, reads = launch(remote)
    per_shard = Counter(m for m, p in s3_requests if ".parquet" in p)
    assert reads == len(files) and per_shard == {"HEAD": len(files), "GET": len(files)}  # BENCHMARKS.md's counts
    s3_requests.clear()
    again = child(remote)
    assert again["reads"] == 0 and again["footers"] == first
    assert s3_requests and not [r for r in s3_requests if ".parquet" in r[1]]  # the listing's requests only


def test_the_suite_never_touches_the_users_cache():
    """conftest points the cache at a folder of this session (inherited by subprocesses and Ray workers)."""
    folder = shards.cache_dir()
    assert folder and os.path.basename(folder).startswith("reclip-test-cache-")
    assert not folder.startswith(os.path.join(os.path.expanduser("~"), ".cache"))
