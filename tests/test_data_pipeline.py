"""Ray Data pipeline: one set of shards, two phase resolutions, bad rows flagged (``_ok = 0``) with their reason.

The first two tests run the phase stream through Ray Data (slow); the decode-concurrency test needs no Ray.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reclip_ray.data.images import decode_image
from reclip_ray.data.pipeline import phase_dataset
from reclip_ray.data.schema import ColumnMap, check_schema
from reclip_ray.data.shards import list_parquet_files, read_footers
from reclip_ray.data.stream import BAD, OK, PhaseStream, unit_permutation
from reclip_ray.errors import DataError


def _collect(ds) -> dict[str, np.ndarray]:
    """Every row of a phase dataset, as one numpy batch (blocks concatenated in arrival order)."""
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    assert blocks
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


@pytest.mark.slow
def test_two_resolutions_from_the_same_shards(ray_session, synth_dir, tokenizer_path, s3_prefix):
    """Also: the same phase read by Ray Data's tasks from a copy of the shards on S3 (moto's server), with the
    tokenizer given as an s3:// path, yields the same rows at the same positions as the local read."""
    from reclip_ray import storage
    from reclip_ray.data.tokenizer import load_tokenizer

    tok_json = tokenizer_path.read_text()
    files = list_parquet_files(str(synth_dir / "eval"))
    stream = PhaseStream(read_footers(files), seed=0, passes=1, shuffle=False)
    assert stream.total_rows == 200
    source = {r["key"]: r for f in files for r in pq.read_table(f, columns=["key", "image", "caption"]).to_pylist()}
    # Stream position 0 is the first row of unit 0's permutation; unit 0 is the first chunk of each shard of group 0
    # (in file order: no shuffle), concatenated.
    group = stream.groups[0]
    unit0 = [k for f in group.files for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()[:stream.chunk_rows]]
    assert len(unit0) == group.unit_sizes()[0]
    expected_key = unit0[int(unit_permutation(0, 0, 0, 0, len(unit0))[0])]
    for size, length in ((32, 8), (96, 20)):
        ds = phase_dataset(stream, ColumnMap(), image_size=size, text_length=length, tokenizer_json=tok_json,
                           train=False, keep_keys=True)
        rows = _collect(ds)
        assert sorted(rows["_pos"].tolist()) == list(range(200))  # every row once, none dropped
        assert (rows["_ok"] == OK).all(), [b for b in rows["_bad"] if b]
        assert rows["image"].shape == (200, size, size, 3) and rows["image"].dtype == np.uint8
        assert rows["tokens"].shape == (200, length) and rows["tokens"].dtype == np.int64
        assert sorted(rows["key"].tolist()) == sorted(source)
        # eval decode is deterministic: the row at stream position 0 equals a direct decode_image of its source row
        i = int(np.flatnonzero(rows["_pos"] == 0)[0])
        key = str(rows["key"][i])
        assert key == expected_key
        assert np.array_equal(rows["image"][i], decode_image(source[key]["image"], size, train=False))
        tok = load_tokenizer(tokenizer_path)
        assert np.array_equal(rows["tokens"][i], tok.encode([source[key]["caption"]], length)[0])
        if size == 32:
            local_rows = rows

    storage.upload_dir(str(synth_dir / "eval"), storage.join(s3_prefix, "eval"))
    storage.write_bytes(storage.join(s3_prefix, "tokenizer.json"), tokenizer_path.read_bytes())
    remote = list_parquet_files(storage.join(s3_prefix, "eval"))
    assert remote[0].startswith("s3://")
    ds = phase_dataset(PhaseStream(read_footers(remote), seed=0, passes=1, shuffle=False), ColumnMap(), image_size=32,
                       text_length=8, tokenizer_json=storage.join(s3_prefix, "tokenizer.json"), train=False,
                       keep_keys=True)
    rows = _collect(ds)
    order, local_order = np.argsort(rows["_pos"]), np.argsort(local_rows["_pos"])
    for column in ("_pos", "key", "image", "tokens", "_ok"):
        assert np.array_equal(rows[column][order], local_rows[column][local_order]), column

    # A restart's position through Ray Data: items with whole units to read past and without (their lists differ in
    # type when empty), and done positions; every other row of the stream comes once.
    train = PhaseStream(read_footers(list_parquet_files(str(synth_dir / "train"))), seed=0, passes=1, group_shards=1)
    g0, g1 = train.groups[:2]
    assert len(train.groups) == 3 and g0.num_units == g1.num_units == 4
    unit_of = np.repeat(np.arange(train.total_units), [n for g in train.groups for n in g.unit_sizes()])
    whole = [g0.first_unit + 2, g1.first_unit + 1]
    done = np.flatnonzero(unit_of == g1.first_unit + 2)[::3]
    items = train.items(1, done, whole)
    assert [bool(i["skip_rounds"]) for i in items] == [True, True, False] and items[0]["start_round"] == 1
    ds = phase_dataset(train, ColumnMap(), image_size=32, text_length=8, tokenizer_json=tok_json, train=False,
                       frontier=1, units=whole, done=done)
    expected = np.flatnonzero((unit_of >= 1) & ~np.isin(unit_of, whole) & ~np.isin(np.arange(len(unit_of)), done))
    assert sorted(_collect(ds)["_pos"].tolist()) == expected.tolist()


@pytest.mark.slow
def test_a_shard_gone_mid_run_reaches_the_reader_as_our_data_error(ray_session, synth_dir, tokenizer_path, tmp_path):
    """The error is raised in a Ray Data task; a Ray Train worker reads through the phase's split coordinator and
    must get it as a ``DataError`` (under Ray's own wrapper), not as Ray Data's ``UserCodeException``: only ours is
    recorded as deterministic (``handover.write_fatal``), so that the run ends at once instead of after
    ``run.max_failures`` restarts that fail at the same shard. (The reader is a generator, whose errors Ray Data
    does not wrap; ``raise_original_map_exception`` in ``phase_dataset`` keeps a plain function's the same.)"""
    import shutil

    from reclip_ray.errors import ReclipError

    for f in list_parquet_files(str(synth_dir / "train"))[:2]:
        shutil.copy(f, tmp_path)
    stream = PhaseStream(read_footers(list_parquet_files(str(tmp_path))), seed=0, passes=1, group_shards=1,
                         shuffle=False)
    gone = stream.groups[1].files[0]
    ds = phase_dataset(stream, ColumnMap(), image_size=32, text_length=8, tokenizer_json=tokenizer_path.read_text())
    (split,) = ds.streaming_split(1, equal=True)
    (tmp_path / gone.rsplit("/", 1)[-1]).unlink()
    with pytest.raises(ReclipError) as info:
        for _ in split.iter_batches(batch_size=None):
            pass
    assert isinstance(info.value, DataError) and f"shard {gone} disappeared during the run" in str(info.value)

    # The decode is a plain function: a tokenizer file gone after the driver's check fails there
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(tokenizer_path.read_text())
    stream = PhaseStream(read_footers(list_parquet_files(str(tmp_path))), seed=0, passes=1, shuffle=False)
    (split,) = phase_dataset(stream, ColumnMap(), image_size=32, text_length=8,
                             tokenizer_json=str(tokenizer)).streaming_split(1, equal=True)
    tokenizer.unlink()
    with pytest.raises(ReclipError) as info:
        for _ in split.iter_batches(batch_size=None):
            pass
    assert isinstance(info.value, DataError) and f"tokenizer file not found: {tokenizer}" in str(info.value)


def test_a_shard_gone_with_missing_shards_skip_is_a_warning_naming_it_and_is_counted(tmp_path, capsys):
    """RELIABILITY: with ``data.missing_shards=skip`` a shard deleted mid-run is a warning naming it, its rows are
    not read, and the run's count of missing shards hears of it; with ``fail`` (the default) it is our one line."""
    from reclip_ray.data.pipeline import _ShardChunks

    gone = str(tmp_path / "shard-00003.parquet")
    heard: list[str] = []
    chunks = _ShardChunks(gone, [8], 4, 0, ColumnMap(), "skip", heard.append)
    assert list(chunks._batches) == [] and heard == [gone]
    assert capsys.readouterr().out == f"[reclip] WARNING: shard {gone} is gone; skipped (data.missing_shards=skip)\n"
    with pytest.raises(DataError, match=rf"^shard {gone} disappeared during the run \(data.missing_shards=fail; "):
        _ShardChunks(gone, [8], 4, 0, ColumnMap(), "fail", heard.append)
    assert heard == [gone]


@pytest.mark.slow
def test_bad_rows_flagged_with_renamed_columns(ray_session, synth_dir, tokenizer_path, tmp_path):
    rows = pq.read_table(list_parquet_files(str(synth_dir / "train"))[0]).slice(0, 40).to_pylist()
    rows[3]["image"] = rows[3]["image"][:200]  # truncated JPEG
    rows[10]["image"] = b"not an image"
    rows[20]["caption"] = ""
    renamed = [{"key": r["key"], "jpg": r["image"], "txt": r["caption"]} for r in rows]  # img2dataset-like names
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "d" / "part-00000.parquet")
    files = list_parquet_files(str(tmp_path / "d"))

    # What train.prepare.prepare runs before any Ray work: the default column names are missing, and it says which.
    with pytest.raises(DataError, match="missing image column 'image'.*data.image_column=jpg"):
        check_schema(files, ColumnMap())
    columns = ColumnMap(image="jpg", caption="txt")
    check_schema(files, columns)

    stream = PhaseStream(read_footers(files, image_column="jpg"), seed=1, passes=1)
    ds = phase_dataset(stream, columns, image_size=48, text_length=12, tokenizer_json=str(tokenizer_path),
                       train=True)
    out = _collect(ds)
    assert sorted(out["_pos"].tolist()) == list(range(40))  # bad rows travel on (flagged), none are lost
    ok = out["_ok"]
    assert int((ok == OK).sum()) == 37 and int((ok == BAD).sum()) == 3
    assert all(b == "" for b in out["_bad"][ok == OK])
    assert not out["image"][ok == BAD].any()  # blank image for a bad row
    reasons = sorted(str(b) for b in out["_bad"][ok == BAD])
    expected = {3: "truncated image", 10: "cannot identify image", 20: "empty caption"}
    assert len(reasons) == 3
    for r, why in expected.items():
        prefix = f"part-00000.parquet row {r} key={rows[r]['key']}: {why}"
        assert sum(reason.startswith(prefix) for reason in reasons) == 1, (prefix, reasons)


@pytest.mark.slow
def test_a_phases_blocks_hold_about_block_mb_of_rows_at_its_image_size(ray_session, make_cfg, tmp_path, tokenizer_path):
    """``data.block_mb``: the blocks a phase's split hands out hold about ``run_names.block_rows`` rows, that many
    MB of decoded images, so a 32 px phase sends fewer, larger blocks than a 96 px one (every block costs the split
    coordinator the same CPU); never fewer rows than ``data.decode_batch_size``, never more than a read unit
    (``group_shards x chunk_rows``). Ray Data cuts its output at ``target_max_block_size``, 1.1x a decode batch's
    bytes, so a block holds the batch's rows or a few more (the median), never twice as many. Through the trainer's
    own dataset factory and Ray Data, on 600 rows."""
    from reclip_ray.data.shards import read_footers
    from reclip_ray.run_names import block_rows
    from reclip_ray.train.datasets import PhaseDatasetFactory

    # (block_mb, image size, rows per block): 0.3 MiB / 3,072 bytes per 32 px row is 102 rows; at 96 px it would
    # be 11, so decode_batch_size's 64; 8 MiB at 32 px is 2,730 rows, so one unit, 1,024; block_mb=0: 64.
    cases = [(0.3, 32, 102), (0.3, 96, 64), (8.0, 32, 1024), (0.0, 32, 64)]
    for block_mb, size, expected in cases:
        cfg = make_cfg(f"blocks{block_mb}", extra=[f"data.block_mb={block_mb}", f"phases.0.image_size={size}"])
        assert block_rows(cfg, size) == expected
        shards = read_footers(list_parquet_files(cfg.data.train))
        factory = PhaseDatasetFactory(cfg, 0, shards, passes=1, tokenizer_json=tokenizer_path.read_text(),
                                      run_dir=str(tmp_path / f"run{block_mb}-{size}"), concurrency=2)
        sizes = [len(b["_pos"]) for b in factory().iter_batches(batch_size=None, batch_format="numpy")]
        assert sum(sizes) == 600 and max(sizes) < 2 * expected, (block_mb, size, sizes)
        if expected < 300:  # several blocks
            assert expected <= np.median(sizes) <= 1.25 * expected, (block_mb, size, sizes)


@pytest.mark.slow
def test_a_phase_dataset_is_built_without_an_object_per_read_item_and_runs_one_task_per_item(
        ray_session, synth_dir, tokenizer_path):
    """Ray Train's controller builds every phase's dataset at every worker-group start. ``ray.data.from_items`` put
    one block per read item there (~1.5 ms each: minutes a phase for 32 passes over 140k shards, BENCHMARKS.md);
    building it now creates no object at any item count (the driver's reference table holds none more). Run, the
    read of an item and its decode are one task per item (``ReadItems->MapBatches(read_and_decode)``), not one
    task per decode batch's worth of items, which a batch-size map after the items gave."""
    import re

    import ray

    from reclip_ray.data.shards import Shard

    def objects() -> int:
        return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())

    shards = [Shard(f"/nonexistent/{i:04d}.parquet", 8, (8,)) for i in range(300)]  # made up: built, never read
    stream = PhaseStream(shards, seed=0, passes=1, group_shards=1)
    before = objects()
    ds = phase_dataset(stream, ColumnMap(), image_size=32, text_length=8, tokenizer_json=str(tokenizer_path))
    assert len(stream.items()) == 300 and objects() - before < 10, objects() - before
    del ds

    train = PhaseStream(read_footers(list_parquet_files(str(synth_dir / "train"))), seed=0, passes=1, group_shards=1)
    ds = phase_dataset(train, ColumnMap(), image_size=32, text_length=8, tokenizer_json=str(tokenizer_path),
                       concurrency=2)
    assert sorted(_collect(ds)["_pos"].tolist()) == list(range(train.total_rows))
    tasks = re.search(r"ReadItems->MapBatches\(read_and_decode\): (\d+) tasks executed", ds.stats())
    assert tasks and int(tasks.group(1)) == len(train.items()) == 3, ds.stats()


def test_a_restart_after_a_phase_does_not_rebuild_its_stream(ray_session, make_cfg, tmp_path, tokenizer_path,
                                                             monkeypatch):
    """Ray Train calls every phase's factory at each worker-group start; a phase the restored checkpoint has
    finished is never read (``Worker.finished``), and rebuilding its stream costs the controller its read items and
    their dataset (0.8 s for one pass over 140k shards, 13-16 s while ``from_items`` put them: BENCHMARKS.md). It
    gets a one-row placeholder; the phase the run is in, and the phases after it, get their streams."""
    from reclip_ray.data.shards import read_footers
    from reclip_ray.data.stream import PhaseStream
    from reclip_ray.train import datasets

    cfg = make_cfg("finished")
    shards = read_footers(list_parquet_files(cfg.data.train))
    factories = [datasets.PhaseDatasetFactory(cfg, i, shards, passes=1, tokenizer_json=tokenizer_path.read_text(),
                                              run_dir=str(tmp_path / "run"), concurrency=2) for i in (0, 1)]
    built = []
    items = PhaseStream.items
    monkeypatch.setattr(PhaseStream, "items", lambda self, *a, **k: built.append(self) or items(self, *a, **k))
    for phase, phase_done, rebuilt in ((0, False, [0, 1]), (0, True, [1]), (1, False, [1]), (1, True, [])):
        state = {"phase": phase, "phase_done": phase_done, "samples": 64}
        monkeypatch.setattr(datasets, "latest_checkpoint_state", lambda run_dir, s=state: ("checkpoint_x", s))
        built.clear()
        made = [f() for f in factories]  # lazy: nothing is read or decoded here
        assert [f.stream for f in factories if f.stream in built] == [factories[i].stream for i in rebuilt], state
        for i in sorted({0, 1} - set(rebuilt)):
            assert made[i].take_all() == [{"finished_phase": i}], state


# ------------------------------------------------------------------------------------------------ no Ray needed


@pytest.mark.parametrize("cpus, default", [(9.0, 9), (2.0, 4)])
def test_decode_concurrency_comes_from_the_config_or_the_cluster(monkeypatch, cpus, default):
    """The default is one task per cluster CPU, at least ``MAX_TASKS``; ``data.read_parallelism`` overrides it.

    ``ray.cluster_resources`` is faked (no Ray is started): with 9 CPUs the default must follow the cluster, with 2
    it must take the floor, so neither a constant nor a formula that ignores one of the two passes.
    """
    import ray

    from reclip_ray.config import load_config
    from reclip_ray.data.pipeline import MAX_TASKS
    from reclip_ray.train.datasets import decode_concurrency

    assert MAX_TASKS == 4
    calls = []

    def fake_resources():
        calls.append(1)
        return {"CPU": cpus, "memory": 1e9}

    monkeypatch.setattr(ray, "cluster_resources", fake_resources)
    assert decode_concurrency(load_config("tiny")) == default
    assert calls, "decode_concurrency did not ask the cluster"
    assert decode_concurrency(load_config("tiny", ["data.read_parallelism=3"])) == 3


@pytest.mark.slow
def test_the_missing_shard_count_never_holds_rank_0_longer_than_its_timeout(ray_session):
    """Rank 0 asks the run's missing-shards actor for its count at every log window, while the other ranks wait at
    the next collective: an actor that answers counts the files it was told, one that hangs (restarting after its
    node died) or is dead gives None within the timeout instead of holding the step."""
    import time

    from reclip_ray.data.pipeline import get_or_create_missing_shards, missing_shard_count

    actor = get_or_create_missing_shards("test-missing-count")
    ray_session.get([actor.add.remote("a.parquet"), actor.add.remote("b.parquet"), actor.add.remote("a.parquet")])
    assert missing_shard_count(actor) == 2

    @ray_session.remote(num_cpus=0)
    class Hung:
        def missing(self):
            time.sleep(60)

    hung = Hung.remote()
    t0 = time.monotonic()
    assert missing_shard_count(hung, timeout_s=1.0) is None
    assert time.monotonic() - t0 < 10
    ray_session.kill(hung)
    ray_session.kill(actor)  # asynchronous: a call right after it may still be answered
    deadline = time.monotonic() + 30
    while missing_shard_count(actor, timeout_s=1.0) is not None:
        assert time.monotonic() < deadline, "the killed actor still answers"
        time.sleep(0.2)
