"""The phase stream without Ray: PhaseStream's order, read_groups' units, decode_batch's flags, PhaseFeed's position.

Everything here calls the plain functions that Ray Data would run (``read_groups`` with a one-item table,
``decode_batch`` with a numpy batch) and checks them against references read straight from the Parquet files.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layouts import write_img2dataset, write_messy
from reclip_ray.data.feed import DataPosition, PhaseFeed
from reclip_ray.data.images import decode_image
from reclip_ray.data.pipeline import decode_batch, read_groups
from reclip_ray.data.schema import ColumnMap
from reclip_ray.data.shards import read_footers
from reclip_ray.data.stream import BAD, MARKER, OK, PhaseStream, rows_to_skip, unit_permutation
from reclip_ray.errors import CheckpointError, DataError

INT_COLUMNS = ("_pass", "_pos", "_unit", "_unit_rows", "_unit_absent", "_row")


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def synth_rows(synth_dir) -> list[dict]:
    """(key, image, caption) of the shared synthetic train rows: real JPEG bytes to build small shards from."""
    files = sorted((synth_dir / "train").glob("*.parquet"))
    return [r for f in files for r in pq.read_table(f, columns=["key", "image", "caption"]).to_pylist()]


def write_shards(folder: Path, sizes, source: list[dict], prefix: str, row_group_size: int | None = None,
                 edits: dict | None = None) -> list[str]:
    """Shards of ``sizes`` rows (keys ``PREFIX-SS-III``), images/captions cycled from ``source``.
    ``edits[(shard, row)]`` is "null" (absent image) or "corrupt" (undecodable bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    edits = edits or {}
    files, k = [], 0
    for s, n in enumerate(sizes):
        rows = []
        for i in range(n):
            src = source[k % len(source)]
            k += 1
            image = src["image"]
            if edits.get((s, i)) == "null":
                image = None
            elif edits.get((s, i)) == "corrupt":
                image = image[: len(image) // 3] if i % 2 else b"<html><body>404</body></html>"
            rows.append({"key": f"{prefix}-{s:02d}-{i:03d}", "image": image, "caption": src["caption"]})
        schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string())])
        path = folder / f"{prefix}-{s:02d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema), path, row_group_size=row_group_size)
        files.append(str(path))
    return files


def read_item(item: dict, chunk_rows: int, seed: int, columns: ColumnMap = ColumnMap()) -> list[pa.Table]:
    return list(read_groups(pa.Table.from_pylist([item]), columns=columns, chunk_rows=chunk_rows, seed=seed))


def read_stream(stream: PhaseStream, frontier: int = 0, done=(), columns: ColumnMap = ColumnMap(),
                units=()) -> list[pa.Table]:
    out = []
    for item in stream.items(frontier, done, units):
        out += read_item(item, stream.chunk_rows, stream.seed, columns)
    return out


def as_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A read table as the numpy batch Ray Data hands to decode_batch."""
    out = {}
    for c, values in table.to_pydict().items():
        if c == "_marker":
            out[c] = np.asarray(values, dtype=bool)
        elif c in INT_COLUMNS:
            out[c] = np.asarray(values, dtype=np.int64)
        else:
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[c] = arr
    return out


def decode(table: pa.Table, tokenizer: Path, *, size: int = 16, train: bool = True, seed: int = 0) -> dict:
    return decode_batch(as_batch(table), image_size=size, text_length=8, tokenizer_json=str(tokenizer), train=train,
                        seed=seed, keep_keys=True)


def decoded_blocks(stream: PhaseStream, tokenizer: Path, *, frontier: int = 0, done=(), units=(),
                   batch_rows: int = 16, columns: ColumnMap = ColumnMap(), train: bool = True) -> list[dict]:
    """Decode batches as Ray Data would make them: each read task's output cut into ``batch_rows``-row batches (so
    a batch spans unit boundaries)."""
    blocks = []
    for item in stream.items(frontier, done, units):
        table = pa.concat_tables(read_item(item, stream.chunk_rows, stream.seed, columns))
        for start in range(0, table.num_rows, batch_rows):
            blocks.append(decode(table.slice(start, batch_rows), tokenizer, train=train, seed=stream.seed))
    return blocks


def drain(feed: PhaseFeed, batch: int, limit: int | None = None) -> list[dict]:
    """``limit`` batches, or (limit None) every row the feed has, the last batch short."""
    out = []
    while limit is None or len(out) < limit:
        b = feed.take(batch)
        if b is None:
            if limit is None and feed.available:
                out.append(feed.take(feed.available))
            break
        out.append(b)
    if limit is not None:
        assert len(out) == limit, "the stream ended before the batches the test wanted"
    return out


def settle(feeds: list[PhaseFeed]) -> list[dict[str, int]]:
    """A checkpoint's two all-gathers (``rank_data.settle_data``) between feeds in one process."""
    reports = [f.report() for f in feeds]
    settled = [f.merge(reports) for f in feeds]
    pending = [f.pending() for f in feeds]
    for f in feeds:
        f.agree(pending)
    return settled


def pass_keys(batches: list[dict]) -> list[tuple[int, str]]:
    return [(int(p), str(k)) for b in batches for p, k in zip(b["_pass"], b["key"])]


def file_keys(files) -> dict[str, list[str]]:
    return {f: pq.read_table(f, columns=["key"]).column("key").to_pylist() for f in files}


# ------------------------------------------------------------------------------------------------ 1. the stream


def _stream_rows(tables: list[pa.Table]) -> list[tuple[int, str, int]]:
    return [(p, k, q) for t in tables for p, k, q in zip(t["_pass"].to_pylist(), t["key"].to_pylist(),
                                                         t["_pos"].to_pylist())]


def test_stream_covers_every_position_and_key_once_per_pass(tmp_path, synth_rows):
    sizes = [7, 31, 1, 0, 20]  # uneven, one single-row shard, one empty shard (dropped by the stream)
    files = write_shards(tmp_path, sizes, synth_rows, "u", row_group_size=6)
    truth = file_keys(files)
    keys = sorted(k for ks in truth.values() for k in ks)
    n, passes, chunk = len(keys), 3, 5
    assert n == sum(sizes)
    stream = PhaseStream(read_footers(files), seed=3, passes=passes, group_shards=2, chunk_rows=chunk)
    assert stream.total_rows == passes * n

    # Files: every non-empty shard once per pass, in an order that changes between passes.
    orders = [[f for g in stream.groups if g.pass_index == p for f in g.files] for p in range(passes)]
    nonempty = sorted(f for f, s in zip(files, sizes) if s)
    assert all(sorted(o) == nonempty for o in orders)
    assert len({tuple(o) for o in orders}) > 1, orders

    tables = read_stream(stream)
    # One table per unit, units numbered densely in stream order, positions contiguous and increasing.
    units = [t["_unit"].to_pylist() for t in tables]
    assert all(len(set(u)) == 1 for u in units)
    assert [u[0] for u in units] == list(range(stream.total_units))
    group_of = {u: g for g in stream.groups for u in range(g.first_unit, g.first_unit + g.num_units)}
    next_pos = 0
    unordered_units = 0
    for t in tables:
        d = t.to_pydict()
        assert not any(d["_marker"])
        unit = d["_unit"][0]
        g, k = group_of[unit], unit - group_of[unit].first_unit
        assert sorted(d["_pos"]) == list(range(next_pos, next_pos + t.num_rows))
        next_pos += t.num_rows
        assert t.num_rows == g.unit_sizes()[k]
        assert set(d["_pass"]) == {g.pass_index}
        # A unit is round k of its group: rows [k*chunk, (k+1)*chunk) of every shard of the group.
        expected = {(f, r) for f, rows in zip(g.files, g.rows) for r in range(k * chunk, min(rows, (k + 1) * chunk))}
        got = list(zip(d["_file"], d["_row"]))
        assert sorted(got) == sorted(expected)
        assert all(truth[f][r] == key for f, r, key in zip(d["_file"], d["_row"], d["key"]))
        # Stream order within a unit is the unit's permutation of its rows (shards concatenated in group order).
        in_file_order = sorted(got, key=lambda fr: (g.files.index(fr[0]), fr[1]))
        perm = unit_permutation(stream.seed, g.pass_index, g.index, k, t.num_rows)
        assert got == [in_file_order[i] for i in perm]
        unordered_units += got != in_file_order
    assert next_pos == stream.total_rows
    assert unordered_units > 0

    rows = _stream_rows(tables)
    assert sorted(q for _, _, q in rows) == list(range(passes * n))
    for p in range(passes):
        in_pass = [(k, q) for pp, k, q in rows if pp == p]
        assert sorted(q for _, q in in_pass) == list(range(p * n, (p + 1) * n))
        assert sorted(k for k, _ in in_pass) == keys
    assert Counter((p, k) for p, k, _ in rows) == Counter({(p, k): 1 for p in range(passes) for k in keys})

    # Deterministic from the seed and the footers alone; another seed is another order.
    again = PhaseStream(read_footers(files), seed=3, passes=passes, group_shards=2, chunk_rows=chunk)
    assert [(k, q) for _, k, q in _stream_rows(read_stream(again))] == [(k, q) for _, k, q in rows]
    other = PhaseStream(read_footers(files), seed=4, passes=passes, group_shards=2, chunk_rows=chunk)
    other_rows = _stream_rows(read_stream(other))
    assert [(k, q) for _, k, q in other_rows] != [(k, q) for _, k, q in rows]
    assert Counter((p, k) for p, k, _ in other_rows) == Counter((p, k) for p, k, _ in rows)


# ------------------------------------------------------------------------------------------------ 2. restart


def test_restart_from_merged_position_trains_every_row_exactly_once(tmp_path, synth_rows, tokenizer_path):
    sizes = [13, 22, 9, 17, 30, 3]
    edits = {(1, 3): "null", (3, 0): "null", (0, 2): "corrupt", (4, 11): "corrupt"}
    edits.update({(5, i): "null" for i in range(3)})  # a shard of absent rows only
    files = write_shards(tmp_path, sizes, synth_rows, "r", row_group_size=5, edits=edits)
    truth = file_keys(files)
    key_edit = {truth[files[s]][i]: e for (s, i), e in edits.items()}
    valid = [k for ks in truth.values() for k in ks if k not in key_edit]
    passes, batch, buffer = 2, 8, 24
    reference = Counter({(p, k): 1 for p in range(passes) for k in valid})
    n_bad = sum(e == "corrupt" for e in edits.values()) * passes
    n_absent = sum(e == "null" for e in edits.values()) * passes

    def new_stream():  # what a restarted run computes: the footers again
        return PhaseStream(read_footers(files), seed=11, passes=passes, group_shards=2, chunk_rows=4)

    stream = new_stream()
    blocks = decoded_blocks(stream, tokenizer_path)

    # Uninterrupted, one rank.
    solo = PhaseFeed(iter(blocks), buffer_rows=buffer, seed=1)
    solo_batches = drain(solo, batch)
    assert Counter(pass_keys(solo_batches)) == reference
    images = {pk: img for b in solo_batches for pk, img in zip(pass_keys([b]), b["image"])}
    (settled,) = settle([solo])
    assert settled == {"seen": len(reference) + n_bad, "bad": n_bad, "absent": n_absent}
    assert solo.position() == DataPosition(frontier=stream.total_units)

    # Two ranks, blocks dealt alternately; two checkpoints (merges), then a "crash".
    its = [iter(blocks[0::2]), iter(blocks[1::2])]
    feeds = [PhaseFeed(it, buffer_rows=buffer, seed=1) for it in its]
    before: list[dict] = []
    totals = Counter()
    for takes in ((2, 2), (3, 1)):
        for feed, count in zip(feeds, takes):
            before += drain(feed, batch, count)
        settled = settle(feeds)  # every rank merges the same reports: the same counts
        assert settled[0] == settled[1]
        totals.update(settled[0])
    position = feeds[0].position()
    assert position == feeds[1].position()
    assert DataPosition.from_dict(position.to_dict()) == position
    assert position.frontier > 0 and len(position.done), position  # the restart is neither trivial nor at a unit edge

    def good_pos(bl):
        return [int(q) for b in bl for q, ok in zip(b["_pos"], b["_ok"]) if ok == OK]

    trained_pos = [int(q) for b in before for q in b["_pos"]]
    buffered = {int(q) for f in feeds for q in f._pool["_pos"][f._order[f._head:]]}
    unconsumed = set(buffered)
    unpulled = [b for it in its for b in it]
    unconsumed |= set(good_pos(unpulled))
    unpulled_bad = {int(q) for b in unpulled for q, ok in zip(b["_pos"], b["_ok"]) if ok == BAD}

    # Restart: another worker count, fresh feeds, the stream rebuilt from the position.
    restarted = new_stream()
    blocks2 = decoded_blocks(restarted, tokenizer_path, frontier=position.frontier, done=position.done,
                             units=position.units)
    reread = good_pos(blocks2)
    assert len(reread) == len(set(reread))
    assert set(reread) == unconsumed  # exactly what sat in buffers or was never pulled
    assert not set(reread) & set(trained_pos)
    assert {int(q) for b in blocks2 for q, ok in zip(b["_pos"], b["_ok"]) if ok == BAD} == unpulled_bad
    feeds2 = [PhaseFeed(iter(blocks2[r::3]), buffer_rows=buffer, seed=1, position=position) for r in range(3)]
    after = [b for f in feeds2 for b in drain(f, batch)]
    settled = settle(feeds2)
    assert all(f.position() == DataPosition(frontier=restarted.total_units) for f in feeds2)
    totals.update(settled[0])

    trained_before, trained_after = pass_keys(before), pass_keys(after)
    assert Counter(trained_before + trained_after) == Counter(pass_keys(solo_batches)) == reference
    assert not set(trained_before) & set(trained_after)
    assert len(set(trained_before)) == len(trained_before) and len(set(trained_after)) == len(trained_after)
    # Seen = trained or dropped as bad, once each: the rows the buffers held at the crash arrive twice but count once
    # (they are read again after the restart), exactly as in the uninterrupted run.
    assert buffered and dict(totals) == {"seen": len(reference) + n_bad, "bad": n_bad, "absent": n_absent}
    # Crops are a function of (seed, key, pass): the restart trains the same pixels.
    for b in before + after:
        for pk, img in zip(pass_keys([b]), b["image"]):
            assert np.array_equal(img, images[pk])


# ------------------------------------------------------------------------------------------------ 3. mixing


def _mean_shards_per_batch(files, shard_of, tokenizer, batch, buffer, **stream_kw) -> float:
    stream = PhaseStream(read_footers(files), seed=0, passes=1, chunk_rows=8, **stream_kw)
    feed = PhaseFeed(iter(decoded_blocks(stream, tokenizer, batch_rows=64, train=False)), buffer_rows=buffer, seed=0)
    counts = [len({shard_of[k] for k in b["key"]}) for b in drain(feed, batch)]
    assert sum(counts) > 0
    return float(np.mean(counts))


def test_batches_draw_from_many_shards(tmp_path, synth_rows, tokenizer_path):
    # 48-row shards: a file-by-file reader fills a batch of 32 from 1 or 2 of them (the lower bound below)
    files = write_shards(tmp_path, [48] * 24, synth_rows, "m")
    shard_of = {k: f for f, ks in file_keys(files).items() for k in ks}
    mixed = _mean_shards_per_batch(files, shard_of, tokenizer_path, 32, 320, group_shards=16)
    by_file = _mean_shards_per_batch(files, shard_of, tokenizer_path, 32, 0, group_shards=1, shuffle=False)
    print(f"\nmean distinct shards per batch of 32: group_shards=16 + buffer 320: {mixed:.2f}; "
          f"group_shards=1, no shuffle, no buffer: {by_file:.2f}")
    assert mixed >= 8
    assert by_file <= 2


# ------------------------------------------------------------------------------------------------ 4. absent, bad


def _null_or_failed(file: str, image_column: str) -> list[bool]:
    t = pq.read_table(file, columns=[image_column, "status"])
    return [img is None or st != "success" for img, st in zip(t.column(image_column).to_pylist(),
                                                               t.column("status").to_pylist())]


@pytest.mark.parametrize("caption_column", ["caption", "txt"])
def test_absent_rows_markers_and_bad_rows(tmp_path, tokenizer_path, caption_column):
    a = write_img2dataset(tmp_path / "a", n_rows=40, failed_fraction=0.3, seed=1, shards=2, extra_columns=False,
                          corrupt=3, caption_column=caption_column)
    b = write_img2dataset(tmp_path / "b", n_rows=36, failed_fraction=1.0, seed=2, shards=1, extra_columns=False,
                          caption_column=caption_column)  # failed downloads only
    assert a.absent and a.bad and b.absent == b.rows
    files = a.files + b.files
    columns = ColumnMap(image=a.image_column, caption=a.caption_column)
    chunk = 8
    footers = read_footers(files, "jpg")
    assert sum(s.absent for s in footers) == a.absent + b.absent
    stream = PhaseStream(footers, seed=5, passes=1, group_shards=3, chunk_rows=chunk, shuffle=False)
    assert len(stream.groups) == 1

    # Reference per unit (round k of the one group), straight from the files.
    flags = {f: _null_or_failed(f, "jpg") for f in files}
    expected_absent = {k: sum(sum(flags[f][k * chunk:(k + 1) * chunk]) for f in files)
                       for k in range(stream.total_units)}
    expected_markers = {k for k in range(stream.total_units)
                        if all(all(flags[f][k * chunk:(k + 1) * chunk]) for f in files)}
    assert expected_markers  # the all-failed shard outlasts the others

    tables = read_stream(stream, columns=columns)
    got_absent, markers, emitted = {}, set(), []
    for t in tables:
        d = t.to_pydict()
        unit = d["_unit"][0]
        assert set(d["_unit"]) == {unit} and len(set(d["_unit_absent"])) == 1
        got_absent[unit] = d["_unit_absent"][0]
        assert set(d["_unit_rows"]) == {t.num_rows}
        if any(d["_marker"]):
            assert t.num_rows == 1 and d["_pos"] == [-1]
            markers.add(unit)
        else:
            assert all(img is not None for img in d["image"])
            emitted += d["key"]
    assert got_absent == expected_absent
    assert sum(got_absent.values()) == a.absent + b.absent
    assert markers == expected_markers
    assert sorted(emitted) == sorted(a.valid_keys + a.bad_keys)
    assert not set(emitted) & set(a.absent_keys)

    blocks = [decode(t, tokenizer_path, train=False) for t in tables]
    ok = np.concatenate([bl["_ok"] for bl in blocks])
    assert int((ok == MARKER).sum()) == len(expected_markers)
    row_of = {k: (os.path.basename(f), i) for f in a.files for i, k in enumerate(file_keys([f])[f])}
    bad_keys = []
    for bl in blocks:
        for key, flag, reason in zip(bl["key"], bl["_ok"], bl["_bad"]):
            if flag == BAD:
                base, row = row_of[key]
                assert f"{base} row {row} key={key}:" in reason, reason
                bad_keys.append(key)
            else:
                assert reason == ""
    assert sorted(bad_keys) == sorted(a.bad_keys)

    # Two ranks, a merge every two batches: the settled counts add up to the layout's, each unit's absent rows once
    # the unit is done (before the frontier, or a whole unit beyond it).
    feeds = [PhaseFeed(iter(blocks[r::2]), buffer_rows=8, seed=0) for r in range(2)]
    totals, trained = Counter(), []
    while True:
        got = [f.take(4) for f in feeds]
        trained += [k for g in got if g is not None for k in g["key"]]
        if all(g is None for g in got):
            trained += [k for f in feeds if f.available for k in f.take(f.available)["key"]]
        totals.update(settle(feeds)[0])
        position = feeds[0].position()
        done_units = set(range(position.frontier)) | set(position.units.tolist())
        assert totals["absent"] == sum(expected_absent[u] for u in done_units)
        if all(g is None for g in got):
            break
    assert sorted(trained) == sorted(a.valid_keys)
    assert dict(totals) == {"seen": a.rows - a.absent, "bad": a.bad, "absent": a.absent + b.absent}
    assert all(f.frontier == stream.total_units and f.absent_in_flight() == 0 for f in feeds)


# ------------------------------------------------------------------------------------------------ 5. crops


def test_train_crops_depend_on_the_pass(synth_rows, tokenizer_path):
    r, other = synth_rows[0], synth_rows[1]
    n = 5
    batch = {
        "image": np.array([r["image"]] * 4 + [other["image"]], dtype=object),
        "caption": np.array([r["caption"]] * 4 + [other["caption"]], dtype=object),
        "key": np.array([r["key"]] * 4 + [other["key"]], dtype=object),
        "_pass": np.array([0, 1, 0, 2, 0]), "_marker": np.zeros(n, bool),
        "_file": np.array(["f.parquet"] * n, dtype=object), "_row": np.arange(n), "_pos": np.arange(n),
        "_unit": np.zeros(n, np.int64), "_unit_rows": np.full(n, n), "_unit_absent": np.zeros(n, np.int64),
    }
    kw = dict(image_size=32, text_length=8, tokenizer_json=str(tokenizer_path), keep_keys=True)
    out = decode_batch(batch, train=True, seed=0, **kw)
    img = out["image"]
    assert (out["_ok"] == OK).all()
    assert np.array_equal(img[0], img[2])  # same row, same pass
    assert not np.array_equal(img[0], img[1]) and not np.array_equal(img[1], img[3])  # another pass
    # Position in the batch does not matter (a restart batches rows differently).
    alone = decode_batch({k: v[1:2] for k, v in batch.items()}, train=True, seed=0, **kw)
    assert np.array_equal(alone["image"][0], img[1])
    assert not np.array_equal(decode_batch(batch, train=True, seed=1, **kw)["image"][0], img[0])  # the seed too
    evaluated = decode_batch(batch, train=False, seed=0, **kw)["image"]
    centre = decode_image(r["image"], 32, train=False)
    assert all(np.array_equal(evaluated[i], centre) for i in range(4))


# ------------------------------------------------------------------------------------------------ 6. restart reads


def test_rows_to_skip():
    assert rows_to_skip([6, 6, 6, 6, 7], 14) == ([2, 3, 4], 2)  # inside the 3rd row group
    assert rows_to_skip([6, 6, 6], 12) == ([2], 0)
    assert rows_to_skip([6, 6, 6], 17) == ([2], 5)
    assert rows_to_skip([6, 6, 6], 0) == ([0, 1, 2], 0)
    assert rows_to_skip([6, 6, 6], 18) == ([], 0)
    assert rows_to_skip([0, 5], 0) == ([1], 0)


def test_read_from_a_later_round_skips_row_groups_and_returns_the_tail(tmp_path, synth_rows, monkeypatch):
    files = write_shards(tmp_path, [31, 20], synth_rows, "s", row_group_size=6)
    chunk = 5
    stream = PhaseStream(read_footers(files), seed=2, passes=1, group_shards=2, chunk_rows=chunk, shuffle=False)
    full = read_stream(stream)
    assert [t["_unit"][0].as_py() for t in full] == list(range(stream.total_units))

    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(list(kwargs.get("row_groups") or []))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    frontier = 3  # round 3 = row 15 of each shard: inside the 3rd row group (12..17), 3 rows in
    (item,) = stream.items(frontier)
    assert item["start_round"] == 3
    tail = read_item(item, chunk, stream.seed)
    assert calls == [[2, 3, 4, 5], [2, 3]]  # 31 rows = 5 x 6 + 1; 20 rows = 3 x 6 + 2
    assert [t.to_pydict() for t in tail] == [t.to_pydict() for t in full[frontier:]]
    first = sum(min(n, frontier * chunk) for n in (31, 20))
    assert sorted(q for t in tail for q in t["_pos"].to_pylist()) == list(range(first, stream.total_rows))
    monkeypatch.undo()

    # Several groups and passes: every frontier reads exactly the tail of the full stream.
    files4 = write_shards(tmp_path / "four", [7, 31, 1, 20], synth_rows, "t", row_group_size=6)
    stream4 = PhaseStream(read_footers(files4), seed=9, passes=2, group_shards=3, chunk_rows=chunk)
    full4 = [t.to_pydict() for t in read_stream(stream4)]
    for frontier in range(stream4.total_units):
        assert [t.to_pydict() for t in read_stream(stream4, frontier)] == full4[frontier:], frontier

    # Positions done beyond the frontier are dropped; a unit with all rows done sends one marker.
    unit3 = full4[3]["_pos"]
    some = full4[4]["_pos"][:2]
    tables = read_stream(stream4, 2, unit3 + some)
    by_unit = {t["_unit"][0].as_py(): t.to_pydict() for t in tables}
    assert by_unit[3]["_marker"] == [True] and by_unit[3]["_unit_rows"] == [1]
    assert sorted(by_unit[4]["_pos"]) == sorted(set(full4[4]["_pos"]) - set(some))
    assert by_unit[4]["_unit_rows"][0] == len(full4[4]["_pos"]) - 2
    assert by_unit[2] == full4[2]

    # Whole units done beyond the frontier are not emitted at all (no marker either: the position says they are
    # done): at a group's start the read starts after them, elsewhere it reads past them.
    g0, g1 = stream4.groups[:2]
    assert g0.num_units > 3 and g1.num_units > 2
    whole = [1, 2, g1.first_unit + 1]
    items = stream4.items(1, (), whole)
    assert (items[0]["start_round"], items[0]["skip_rounds"]) == (3, [])  # units 1, 2: the start moves on
    assert (items[1]["start_round"], items[1]["skip_rounds"]) == (0, [1])  # read past round 1
    rest = [t.to_pydict() for t in read_stream(stream4, 1, units=whole)]
    assert rest == [t for u, t in enumerate(full4) if u >= 1 and u not in whole]
    everything = list(range(1, stream4.total_units))
    assert stream4.items(1, (), everything) == [] and read_stream(stream4, 1, units=everything) == []


# ------------------------------------------------------------------------------------------------ 7. footers


def test_read_footers_match_the_files(tmp_path, synth_rows):
    i2d = write_img2dataset(tmp_path / "i2d", n_rows=110, failed_fraction=0.3, seed=3, shards=1, extra_columns=False)
    messy = write_messy(tmp_path / "messy", n_rows=8)
    plain = write_shards(tmp_path / "plain", [23], synth_rows, "p", row_group_size=6,
                         edits={(0, 1): "null", (0, 20): "null"})
    nostats = str(tmp_path / "nostats.parquet")
    pq.write_table(pq.read_table(plain[0]), nostats, row_group_size=10, write_statistics=False)
    noimage = str(tmp_path / "noimage.parquet")
    pq.write_table(pq.read_table(plain[0], columns=["key", "caption"]), noimage, row_group_size=7)

    def check(files, column, with_stats=True):
        footers = read_footers(files, column)
        assert [s.path for s in footers] == list(files)
        assert read_footers(files, column, threads=1) == footers
        for s, f in zip(footers, files):
            pf = pq.ParquetFile(f)
            groups = tuple(pf.read_row_group(i, columns=["key"] if "key" in pf.schema_arrow.names else None).num_rows
                           for i in range(pf.num_row_groups))
            table = pq.read_table(f)
            assert (s.rows, s.row_groups) == (table.num_rows, groups)
            nulls = table.column(column).null_count if column in table.column_names else 0
            assert s.absent == (nulls if with_stats else 0)
        return footers

    (s,) = check(i2d.files, "jpg")
    assert s.row_groups == (100, 10) and s.absent == i2d.absent > 0
    assert sum(s.absent for s in check(messy.files, "image")) == messy.absent == 1
    (s,) = check(plain, "image")
    assert len(s.row_groups) == 4 and s.absent == 2
    check([nostats], "image", with_stats=False)
    (s,) = check([noimage], "image")
    assert s.absent == 0 and s.row_groups == (7, 7, 7, 2)
    assert read_footers([]) == []

    with pytest.raises(DataError, match="not found"):
        read_footers([str(tmp_path / "gone.parquet")])
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet"):
        read_footers([str(junk)])


# ------------------------------------------------------------------------------------------------ 8. side by side


def interleaved_blocks(stream: PhaseStream, tokenizer: Path, tasks: int, *, frontier: int = 0, done=(), units=(),
                       batch_rows: int = 8) -> list[dict]:
    """Decoded blocks as ``tasks`` read tasks deliver them side by side: one block from each running task in turn,
    a task taking the next stream item when its group ends (so later groups finish before earlier ones)."""
    per_item = []
    for item in stream.items(frontier, done, units):
        table = pa.concat_tables(read_item(item, stream.chunk_rows, stream.seed))
        per_item.append([decode(table.slice(s, batch_rows), tokenizer, seed=stream.seed)
                         for s in range(0, table.num_rows, batch_rows)])
    waiting, running, out = list(reversed(per_item)), [], []
    while waiting or running:
        while waiting and len(running) < tasks:
            running.append(iter(waiting.pop()))
        for task in list(running):
            block = next(task, None)
            if block is None:
                running.remove(task)
            else:
                out.append(block)
    return out


def test_restart_with_groups_read_side_by_side_trains_every_row_once(tmp_path, synth_rows, tokenizer_path):
    """The real read path (``read_groups``) with several groups in flight: whole units beyond the frontier go into
    the position as unit numbers, the rebuilt stream skips them, and every row is trained once across a restart."""
    sizes = [24, 17, 24, 9, 24, 24, 12, 24]
    edits = {(0, 5): "null", (2, 7): "corrupt", (5, 1): "null", (5, 2): "corrupt"}
    files = write_shards(tmp_path, sizes, synth_rows, "x", row_group_size=6, edits=edits)
    truth = file_keys(files)
    key_edit = {truth[files[s]][i]: e for (s, i), e in edits.items()}
    passes, batch = 2, 8
    reference = Counter({(p, k): 1 for p in range(passes) for ks in truth.values() for k in ks if k not in key_edit})

    def new_stream():
        return PhaseStream(read_footers(files), seed=4, passes=passes, group_shards=2, chunk_rows=3)

    stream = new_stream()
    blocks = interleaved_blocks(stream, tokenizer_path, tasks=3)
    its = [iter(blocks[0::2]), iter(blocks[1::2])]
    feeds = [PhaseFeed(it, buffer_rows=24, seed=6) for it in its]
    before: list[dict] = []
    for _ in range(3):
        for feed in feeds:
            before += drain(feed, batch, 4)
        settle(feeds)
    position = feeds[0].position()
    assert position == feeds[1].position() == DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))
    # Not trivial: whole units beyond the frontier, and rows done in units that are not.
    assert len(position.units) >= 3 and len(position.done), position
    items = new_stream().items(position.frontier, position.done, position.units)
    assert any(i["skip_rounds"] for i in items)  # a whole unit after a group's first one not done: read past it
    assert any(i["start_round"] > max(0, position.frontier - i["first_unit"]) for i in items)  # one it starts after

    restarted = new_stream()
    blocks2 = interleaved_blocks(restarted, tokenizer_path, tasks=2, frontier=position.frontier, done=position.done,
                                 units=position.units)
    assert not {int(q) for b in blocks2 for q in b["_pos"]} & {int(q) for b in before for q in b["_pos"]}
    feeds2 = [PhaseFeed(iter(blocks2[r::3]), buffer_rows=24, seed=3, position=position) for r in range(3)]
    after = [b for f in feeds2 for b in drain(f, batch)]
    settle(feeds2)
    assert all(f.position() == DataPosition(frontier=restarted.total_units) for f in feeds2)
    trained = pass_keys(before) + pass_keys(after)
    assert Counter(trained) == reference


def _position_sim():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "data_position.py"
    spec = importlib.util.spec_from_file_location("data_position_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


SIDE_BY_SIDE = dict(tasks=8, ranks=4, batch=128, buffer_rows=320, decode_batch=16, queue=16)


def test_position_stays_small_while_groups_are_read_side_by_side():
    """8 groups in flight (64-row units, 1,600-row groups): the earlier position (every done position beyond the
    frontier) grew to 11k positions, 23-250 KB of meta.json; this one stays within ``position_bound`` (0.5-1.7 KB)."""
    sim_mod = _position_sim()
    stream = PhaseStream(sim_mod.shards(64, 400), seed=0, passes=1, group_shards=4, chunk_rows=16)
    sim = sim_mod.Sim(stream, 0, 0.1)
    stats: list[dict] = []
    sim_mod.run(sim, every=1024, samples=stream.total_rows, drain=True, on_checkpoint=stats.append, **SIDE_BY_SIDE)
    assert len(stats) >= 20
    assert max(s["earlier_format_positions"] for s in stats) > 10_000  # the case the earlier position grew in
    for s in stats:  # every checkpoint also checked that the position is exactly the rows trained (``Sim.check``)
        assert s["meta_bytes"] <= s["bound_bytes"] <= 4_000, s
    assert stats[-1]["frontier"] == stream.total_units and stats[-1]["meta_bytes"] < 150


def test_restart_from_any_mid_phase_position_trains_every_row_once_side_by_side():
    """The simulated cluster (groups side by side, absent rows), restarted from a mid-phase checkpoint on 3 ranks
    instead of 4: every present row is trained exactly once over the two runs, the absent ones never."""
    sim_mod = _position_sim()
    stream = PhaseStream(sim_mod.shards(64, 400), seed=1, passes=1, group_shards=4, chunk_rows=16)
    for crash_at in (3072, 12288):
        sim = sim_mod.Sim(stream, 1, 0.1)
        position = sim_mod.run(sim, every=1024, samples=crash_at, **SIDE_BY_SIDE)
        assert len(position.units) and len(position.done), position
        sim.rollback(position)  # the rows trained after the checkpoint are lost with the weights
        saved = sim.trained.copy()
        restored = DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))
        sim_mod.run(sim, every=1024, samples=stream.total_rows, position=restored, restarts=1, drain=True,
                    **(SIDE_BY_SIDE | {"ranks": 3, "batch": 96}))
        assert (sim.trained[sim.present] == 1).all() and not sim.trained[~sim.present].any()

        # The same checkpoint in the earlier format (every done position beyond the frontier, whole units too):
        # the rebuilt stream sends a marker for each unit all done, and the restart trains the same rows.
        sim.trained = saved
        beyond = np.flatnonzero(saved.astype(bool) & (sim.unit_of >= position.frontier))
        earlier = {"phase": 0, "frontier": position.frontier, "done": beyond.tolist(),
                   "done_units": sim.unit_of[beyond].tolist()}
        sim_mod.run(sim, every=1024, samples=stream.total_rows, position=DataPosition.from_dict(earlier), restarts=2,
                    drain=True, **SIDE_BY_SIDE)
        assert (sim.trained[sim.present] == 1).all() and not sim.trained[~sim.present].any()


def test_position_json_is_compact_and_earlier_checkpoints_load():
    position = DataPosition(2, 3, units=[5, 6, 7, 9, 12, 13], done=[100, 101, 103, 200], done_units=[4, 4, 4, 8])
    raw = position.to_dict()
    # Whole units as ranges, done positions as one bitmap per unit (bits 0, 1, 3 from 100 -> 0b1011).
    assert raw == {"phase": 2, "frontier": 3, "units": "5-7,9,12-13", "partial": ["4:100:Cw==", "8:200:AQ=="]}
    assert DataPosition.from_dict(json.loads(json.dumps(raw))) == position
    assert DataPosition.from_dict(None) == DataPosition() and DataPosition().to_dict()["partial"] == []
    # A checkpoint of the earlier format (every done position and its unit) loads as done positions.
    earlier = {"phase": 2, "frontier": 3, "done": [200, 100, 103, 101], "done_units": [8, 4, 4, 4]}
    assert DataPosition.from_dict(earlier) == DataPosition(2, 3, done=[100, 101, 103, 200], done_units=[4, 4, 4, 8])
    for bad in ({"units": "7-5"}, {"units": "x"}, {"partial": ["4:100"]}, {"partial": ["4:100:%%"]},
                {"done": [1, 2]}):
        with pytest.raises(CheckpointError, match="data position"):
            DataPosition.from_dict(bad)


def test_a_groups_rounds_are_counted_without_listing_them(monkeypatch):
    """The stream's build and ``items`` (at every worker-group start) ask every group for its unit count; listing
    each round's rows to count them took 37 s per phase start at 140k shards of 9,200 rows (BENCHMARKS.md, "The
    phase stream at 140,000 shards"). The count is the listing's length, for uneven shards and any chunk size, and
    neither the build nor ``items`` (from a mid-stream frontier) lists a round."""
    from reclip_ray.data import stream
    from reclip_ray.data.shards import Shard

    rng = np.random.default_rng(0)
    shards = [Shard(f"s3://b/{i}.parquet", int(n), (int(n),)) for i, n in enumerate(rng.integers(0, 700, 300))]
    listed = []
    monkeypatch.setattr(stream, "rows_in_round", lambda *a: listed.append(a) or 0)
    for chunk in (1, 7, 64, 1000):
        phase = PhaseStream(shards, seed=1, passes=2, group_shards=16, chunk_rows=chunk)
        frontier = phase.total_units // 2
        assert phase.items(frontier=frontier) and not listed
        monkeypatch.undo()
        for g in phase.groups:
            assert g.num_units == len(stream.unit_sizes(g.rows, chunk)), (chunk, g.rows)
        assert phase.total_units == sum(len(stream.unit_sizes(g.rows, chunk)) for g in phase.groups)
        monkeypatch.setattr(stream, "rows_in_round", lambda *a: listed.append(a) or 0)


def test_a_refill_holds_the_window_twice_at_most_and_serves_the_same_rows_in_the_same_order():
    """A refill keeps the rows not served yet, adds the incoming ones and serves them in a fresh seeded order. It
    used to build the merged window and then a permuted copy of it while the old window and the incoming blocks were
    still held: 4x the window (3.1 GB per worker at 224 px). Now it holds at most the incoming rows and the new
    window (2x), each batch is a copy of its rows (it keeps no window alive), and the rows come in the order the
    window shuffle always served them (the reference below: merge, permute, serve in turn)."""
    import tracemalloc

    size, block_rows, buffer, batch = 32, 64, 1280, 96

    def blocks():
        for u in range(60):
            pos = np.arange(u * block_rows, (u + 1) * block_rows)
            yield {"image": np.broadcast_to((pos % 251).astype(np.uint8)[:, None, None, None],
                                            (block_rows, size, size, 3)).copy(),
                   "tokens": pos[:, None].repeat(8, 1), "_pos": pos, "_unit": np.full(block_rows, u),
                   "_unit_rows": np.full(block_rows, block_rows), "_unit_absent": np.zeros(block_rows, np.int64),
                   "_ok": np.full(block_rows, OK, np.int8), "_bad": np.full(block_rows, "", object)}

    def reference():
        rng, pool, head, it = np.random.default_rng([3, 7]), np.zeros(0, np.int64), 0, blocks()
        while True:
            while len(pool) - head < batch:
                incoming = []
                while sum(map(len, incoming)) < buffer and (b := next(it, None)) is not None:
                    incoming.append(b["_pos"])
                if not incoming:
                    return
                merged = np.concatenate([pool[head:], *incoming])
                pool, head = merged[rng.permutation(len(merged))], 0
            yield pool[head:head + batch]
            head += batch

    feed = PhaseFeed(blocks(), buffer_rows=buffer, seed=3)
    window = buffer * size * size * 3
    tracemalloc.start()
    try:
        served = []
        while (out := feed.take(batch)) is not None:
            served.append(out["_pos"])
            assert (out["image"][:, 0, 0, 0] == out["_pos"] % 251).all() and (out["tokens"][:, 0] == out["_pos"]).all()
            assert not np.shares_memory(out["image"], feed._pool["image"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = list(reference())
    assert len(served) == len(expected) == 60 * block_rows // batch
    assert all((a == b).all() for a, b in zip(served, expected))
    assert peak < 2.5 * window, peak / window  # incoming + the new window (+ rows left, tokens, a batch, a block)


def test_closing_a_feed_mid_stream_closes_the_ray_data_iterator(tmp_path, synth_rows, tokenizer_path):
    """A phase ends at its sample count, mid-stream. ``PhaseFeed.close`` (the worker's phase end) must reach the batch
    iterator: Ray Data's ``finally`` there is what tells the phase's split coordinator that this rank stopped reading,
    so that it stops the phase's executor and drops its buffered blocks."""
    files = write_shards(tmp_path, [20, 20], synth_rows, "c", row_group_size=5)
    blocks = decoded_blocks(PhaseStream(read_footers(files), seed=3, passes=1, group_shards=1, chunk_rows=5),
                            tokenizer_path)
    pulled, closed = [], []

    def batches():  # a generator, as ``iter(DataIterator.iter_batches(...))`` is
        try:
            for block in blocks:
                pulled.append(1)
                yield block
        finally:
            closed.append(len(pulled))

    feed = PhaseFeed(batches(), buffer_rows=8, seed=1)
    assert len(feed.take(4)["_pos"]) == 4
    assert not closed and len(pulled) < len(blocks)  # mid-stream, as a phase end is
    feed.close()
    assert closed == [len(pulled)]
    assert feed.take(100) is None  # nothing is read after the close
    feed.close()  # a second close (an evaluation retried after the phase end) is harmless
    assert closed == [len(pulled)]
