"""Driver start-up at many shards: every footer is read once per launch, and a tokenizer trained at launch reads
a bounded sample of the captions. No Ray: ``prepare`` and ``build_datasets`` run in this process."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reclip_ray.config import ConfigError, load_config
from reclip_ray.data import shards, tokenizer


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (10, 200, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(folder: Path, shards: int, rows: int, caption=lambda s, r: f"a red circle number {s} {r}") -> list[str]:
    folder.mkdir(parents=True)
    image = _jpeg()
    out = []
    for s in range(shards):
        sub = folder / f"part{s // 10}"  # nested, and listing order = shard order
        sub.mkdir(exist_ok=True)
        path = sub / f"{s:04d}.parquet"
        pq.write_table(pa.table({"key": [f"{s}-{r}" for r in range(rows)],
                                 "image": pa.array([image] * rows, type=pa.binary()),
                                 "caption": [caption(s, r) for r in range(rows)]}), path)
        out.append(str(path))
    return sorted(out)


def count_calls(monkeypatch, module, name: str) -> Counter:
    """Wrap ``module.name`` so that its calls are counted by first argument."""
    calls: Counter = Counter()
    real = getattr(module, name)

    def wrapper(first, *args, **kwargs):
        calls[first] += 1
        return real(first, *args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_launch_reads_every_footer_once(tmp_path, monkeypatch):
    from reclip_ray.train.datasets import build_datasets
    from reclip_ray.train.prepare import prepare

    train = write_shards(tmp_path / "data" / "train", 30, 4)
    evals = write_shards(tmp_path / "data" / "eval", 2, 5)
    footers = count_calls(monkeypatch, shards, "_footer")
    captions = count_calls(monkeypatch, tokenizer, "_file_captions")

    def no_other_footer_reads(*a, **k):
        raise AssertionError("a footer read outside shards.footers")

    monkeypatch.setattr(pq, "read_schema", no_other_footer_reads)
    monkeypatch.setattr(pq, "read_metadata", no_other_footer_reads)
    cfg = load_config("tiny", [
        f"data.train={tmp_path / 'data' / 'train'}", f"data.eval={tmp_path / 'data' / 'eval'}", "data.tokenizer=",
        "data.synth_if_missing=false", "data.tokenizer_sample_captions=7", "data.read_parallelism=2",
        f"run.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "scaling.min_workers=1", "scaling.max_workers=1",
    ])
    prep = prepare(cfg)  # schema check, eval-set check, tokenizer
    datasets = build_datasets(prep.cfg, Path(prep.tokenizer_path).read_text(), prep.run_dir)
    assert sorted(datasets) == ["phase0", "phase1"]
    assert footers == Counter({f: 1 for f in train + evals})
    # the tokenizer's sample of 7 captions is in the first 2 shards; it reads at most 2 * 8 files ahead of that
    assert set(captions) <= set(train[:18]) and train[0] in captions and all(n == 1 for n in captions.values())
    # a second launch in the same process (a sweep's driver, a rerun) reads no footer again
    build_datasets(prep.cfg, Path(prep.tokenizer_path).read_text(), prep.run_dir)
    assert sum(footers.values()) == len(train) + len(evals)


def test_footer_cache_sees_a_rewritten_shard(tmp_path):
    (path,) = write_shards(tmp_path / "d", 1, 4)
    assert shards.read_footers([path])[0].rows == 4
    pq.write_table(pa.table({"key": ["x"] * 9, "image": pa.array([b"x"] * 9), "caption": ["c"] * 9}), path + ".tmp")
    Path(path + ".tmp").replace(path)
    assert shards.read_footers([path])[0].rows == 9  # not in a listing: a stat shows the new size and mtime
    assert shards.read_footers(shards.list_parquet_files(tmp_path / "d"))[0].rows == 9


def test_iter_captions_stops_reading_after_the_bound(tmp_path, monkeypatch):
    files = write_shards(tmp_path / "d", 40, 5)
    read = count_calls(monkeypatch, tokenizer, "_file_captions")
    got = list(tokenizer.iter_captions(tmp_path / "d", limit=12, threads=1))
    assert len(got) == 12 and got[0] == "a red circle number 0 0"
    assert set(read) <= set(files[:5])  # 3 files hold the 12 captions; one thread reads at most 2 files ahead
    read.clear()
    assert len(list(tokenizer.iter_captions(tmp_path / "d", limit=12, threads=4))) == 12
    assert len(read) <= 3 + 8 < len(files)
    assert len(list(tokenizer.iter_captions(tmp_path / "d"))) == 200  # no bound: every caption, in file order


def test_train_tokenizer_learns_only_from_the_sample(tmp_path):
    """Shards 0-3 say "red circle ...", the 36 after them "zebra": a 20-caption bound never sees a zebra."""
    write_shards(tmp_path / "d", 40, 5, caption=lambda s, r: "a red circle" if s < 4 else "zebra zebra zebra")
    bounded = tokenizer.train_tokenizer(tmp_path / "d", vocab_size=300, max_captions=20)
    full = tokenizer.train_tokenizer(tmp_path / "d", vocab_size=300)
    assert full._tok.token_to_id("Ġzebra") is not None
    assert bounded._tok.token_to_id("Ġzebra") is None and bounded._tok.token_to_id("Ġcircle") is not None


def test_tokenizer_sample_captions_is_validated():
    assert load_config("tiny").data.tokenizer_sample_captions == 1_000_000
    with pytest.raises(ConfigError, match="data.tokenizer_sample_captions"):
        load_config("tiny", ["data.tokenizer_sample_captions=-1"])


def test_footers_use_threads_only_when_reads_wait_on_storage(tmp_path, monkeypatch):
    """Reads slower than FOOTER_IO_BOUND_S (object storage, NFS) go 32 at a time; fast ones (a local disk, where
    threads only contend for the GIL) stay in the calling thread."""
    import threading
    import time

    files = write_shards(tmp_path / "d", 80, 1)
    real = shards._footer
    seen: set = set()

    def slow(file):
        seen.add(threading.get_ident())
        time.sleep(0.002)
        return real(file)

    monkeypatch.setattr(shards, "_footer", slow)
    assert [f.rows for f in shards.footers(files)] == [1] * 80
    assert len(seen) > 1

    template = real(files[0])
    seen.clear()
    shards.clear_footer_cache()

    def fast(file):
        seen.add(threading.get_ident())
        return template

    monkeypatch.setattr(shards, "_footer", fast)
    shards.footers(files)
    assert seen == {threading.get_ident()}


@pytest.mark.parametrize("workers, split", [((1, 1), []), ((2, 2), "all"), ((1, 2), "all")])
def test_only_a_run_that_always_has_one_worker_reads_its_phases_unsplit(workers, split):
    """streaming_split runs a coordinator actor per phase; a run that can never have a second worker reads its
    stream itself. An elastic run that starts with one worker may get a second, so it is always split."""
    from reclip_ray.train.launch import data_config

    lo, hi = workers
    cfg = load_config("tiny", [f"scaling.min_workers={lo}", f"scaling.max_workers={hi}"])
    assert data_config(cfg)._datasets_to_split == split


def test_a_drivers_imports_leave_timm_to_the_workers():
    """A launch's driver (``reclip-ray train``, a sweep, a sweep's trial) imports the workers' loop, which Ray Train
    pickles by reference, but never builds a model: timm, and the torchvision it imports, stay out of it (measured
    on 2 cores, BENCHMARKS.md "A small run's start-up": importing what a driver imports took 8.2 s with them, 5.6 s
    without, medians of 3)."""
    import subprocess
    import sys

    code = ("import sys, reclip_ray.cli, reclip_ray.train.launch, reclip_ray.sweep.run, ray.train.torch\n"
            "from reclip_ray.train.worker import train_loop_per_worker\n"
            "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_file_uris_name_the_local_data_and_a_preset_that_makes_data_never_writes_over_it(tmp_path):
    """``data.train=file:///DATA/train`` is the local folder (README: any URI pyarrow opens). The launch looked at it
    with ``os.path.exists``, to which ``file:///...`` is missing: with the tiny preset's ``data.synth_if_missing``
    it wrote synthetic shapes into ``DATA/`` (deleting shards named like its own), then refused ``data.eval``."""
    import os

    from reclip_ray.train.prepare import prepare

    train = write_shards(tmp_path / "data" / "train", 2, 4)
    evals = write_shards(tmp_path / "data" / "eval", 1, 5)
    stamps = {p: os.stat(p).st_mtime_ns for p in train + evals}
    cfg = load_config("tiny", [
        f"data.train=file://{tmp_path / 'data' / 'train'}", f"data.eval=file://{tmp_path / 'data' / 'eval'}",
        "data.tokenizer=", "data.tokenizer_sample_captions=7", f"run.storage_path=file://{tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "scaling.min_workers=1", "scaling.max_workers=1",
    ])
    assert cfg.data.synth_if_missing  # the preset's: what made the launch write into the dataset's folder
    prep = prepare(cfg)
    assert (prep.cfg.data.train, prep.run_dir) == (str(tmp_path / "data" / "train"), str(tmp_path / "runs" / "tiny"))
    files = sorted(str(p) for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert files == sorted(train + evals) and {p: os.stat(p).st_mtime_ns for p in files} == stamps
    cfg.data.tokenizer = f"file://{prep.tokenizer_path}"
    assert prepare(cfg).tokenizer_path == prep.tokenizer_path
