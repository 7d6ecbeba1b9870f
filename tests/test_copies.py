"""Shrunk copies (``data shrink``): what is stored, how a phase picks its source, and that crops stay the same."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reclip_ray.data import copies as copies_mod
from reclip_ray.data.copies import choose_sources, parse_sizes, shrink_dataset
from reclip_ray.data.images import BadImage, _crop_box, decode_image, make_copy, min_source_side
from reclip_ray.data.local import row_rng
from reclip_ray.data.pipeline import decode_batch, read_groups
from reclip_ray.data.schema import ColumnMap
from reclip_ray.data.shards import Shard, copy_column, list_parquet_files, read_footers
from reclip_ray.data.stream import PhaseStream
from reclip_ray.data.tokenizer import train_tokenizer
from reclip_ray.errors import DataError
from tests.layouts import photo, write_img2dataset


def _photo(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A photo-like JPEG with noise 8: this file's crop-statistics tolerances were measured on these images."""
    return photo(rng, w, h, noise=8.0)


def _write(path: Path, images: list[bytes | None], start: int = 0) -> None:
    n = len(images)
    pq.write_table(pa.table({"key": [f"k{start + i:05d}" for i in range(n)], "image": pa.array(images, pa.binary()),
                             "caption": [f"picture {start + i}" for i in range(n)],
                             "label": pa.array(np.arange(n) % 3, pa.int32())}), path)


@pytest.fixture
def photos(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    root.mkdir()
    for s in range(3):
        _write(root / f"shard-{s:05d}.parquet",
               [_photo(rng, int(rng.integers(200, 320)), int(rng.integers(200, 320))) for _ in range(12)], 12 * s)
    (root / "dataset.json").write_text(json.dumps({"rows": 36}))
    return root


def test_shrink_img2dataset_layout_keeps_rows_nulls_and_errors(tmp_path):
    layout = write_img2dataset(tmp_path / "i2d", 60, failed_fraction=0.3, corrupt=2, shards=2)
    before = {f: pq.read_table(f) for f in layout.files}
    summary = shrink_dataset(layout.path, "40,80", image_column="jpg", workers=1, log=None)
    assert summary["shards"] == 2 and summary["rows"] == layout.rows and summary["bad_images"] == 2
    present = len(layout.valid_keys) + len(layout.bad_keys)
    assert summary["copies_made"] == 2 * (present - 2)
    assert 0 < summary["bytes_per_sample"]["40"] < summary["bytes_per_sample"]["80"]
    shards = read_footers(layout.files, "jpg")
    assert [s.copies for s in shards] == [(40, 80), (40, 80)] and all(not s.stale_copies for s in shards)
    for f in layout.files:
        after = pq.read_table(f)
        assert after.select(before[f].column_names).equals(before[f])  # every original column is kept as it was
        keys = after.column("key").to_pylist()
        for size in (40, 80):
            for key, full, copy in zip(keys, after.column("jpg").to_pylist(), after.column(f"jpg_{size}").to_pylist()):
                if full is None:
                    assert copy is None, key  # an absent row stays absent in every copy
                elif key in layout.bad_keys:
                    with pytest.raises(BadImage) as from_full:
                        decode_image(full, 32, train=False)
                    with pytest.raises(BadImage) as from_copy:
                        decode_image(copy, 32, train=False)
                    assert str(from_copy.value) == str(from_full.value)  # the same bad-row reason either way
                else:
                    w, h = Image.open(io.BytesIO(copy)).size
                    full_w, full_h = Image.open(io.BytesIO(full)).size
                    assert min(w, h) == min(size, full_w, full_h), (key, size)


def test_shrink_is_atomic_per_shard_and_resumes(photos, monkeypatch):
    files = list_parquet_files(str(photos))
    original = {f: Path(f).read_bytes() for f in files}
    calls = {"n": 0}
    real = copies_mod.make_copy

    def failing(data, size, quality=90):
        calls["n"] += 1
        if calls["n"] == 12 * 2 + 5:  # inside the second shard
            raise RuntimeError("disk full")
        return real(data, size, quality)

    monkeypatch.setattr(copies_mod, "make_copy", failing)
    with pytest.raises(DataError, match=r"shard-00001\.parquet: shrinking failed near row 0: disk full"):
        shrink_dataset(photos, [40, 80], workers=1, log=None)
    assert Path(files[1]).read_bytes() == original[files[1]]  # the failed shard is untouched ...
    assert Path(files[2]).read_bytes() == original[files[2]]
    assert not list(photos.glob("*.shrink-tmp"))  # ... and no half-written file is left behind
    assert read_footers([files[0]])[0].copies == (40, 80)

    monkeypatch.setattr(copies_mod, "make_copy", real)
    summary = shrink_dataset(photos, [40, 80], workers=1, log=None)
    assert summary["shards_skipped"] == 1 and summary["copies_made"] == 2 * 24
    assert [s.copies for s in read_footers(files)] == [(40, 80)] * 3
    again = shrink_dataset(photos, [40], workers=1, log=None)  # sizes already there: nothing to do
    assert again["shards_skipped"] == 3 and again["copies_made"] == 0
    assert json.loads((photos / "dataset.json").read_text())["copies"]["sizes"] == [40]


def test_shrink_to_another_folder_leaves_the_source_alone(photos, tmp_path):
    files = list_parquet_files(str(photos))
    original = {f: Path(f).read_bytes() for f in files}
    out = tmp_path / "with_copies"
    summary = shrink_dataset(photos, "80", out=out, workers=2, log=None)
    assert summary["out"] == str(out) and summary["shards"] == 3
    assert all(Path(f).read_bytes() == original[f] for f in files)
    assert [s.copies for s in read_footers(list_parquet_files(str(out)))] == [(80,)] * 3
    assert json.loads((out / "dataset.json").read_text())["copies"]["sizes"] == [80]


def test_shrink_one_file_to_another_folder_writes_it_there_by_name(photos, tmp_path):
    """`data shrink FILE.parquet --out DIR`: the file's path relative to itself is empty, which made the
    destination the folder itself ("Is a directory"); it is DIR/<the file's name>."""
    src = photos / "shard-00001.parquet"
    original = src.read_bytes()
    out = tmp_path / "one"
    summary = shrink_dataset(src, [40], out=out, workers=1, log=None)
    assert summary["shards"] == 1 and summary["copies_made"] == 12
    assert sorted(os.listdir(out)) == ["shard-00001.parquet"] and src.read_bytes() == original
    assert [s.copies for s in read_footers([str(out / "shard-00001.parquet")])] == [(40,)]


def test_shrink_a_pattern_writes_the_files_it_names_beside_the_dataset_json(photos, tmp_path):
    """A pattern (a Hub split, ``data/train-*.parquet``) names some files of a folder: those are shrunk, to their
    paths under the folder, and the folder's dataset.json travels with them (and records the copies)."""
    (photos / "_delta_log").mkdir()
    (photos / "_delta_log" / "00000.json").write_text("{}")  # not the dataset's: the listing skips it too
    (photos / "_SUCCESS").write_text("")
    out = tmp_path / "some"
    summary = shrink_dataset(f"{photos}/shard-0000[02].parquet", [40], out=out, workers=1, log=None)
    assert summary["shards"] == 2 and summary["copies_made"] == 24
    assert sorted(os.listdir(out)) == ["dataset.json", "shard-00000.parquet", "shard-00002.parquet"]
    assert json.loads((out / "dataset.json").read_text())["copies"]["sizes"] == [40]


def test_a_shard_that_is_not_parquet_is_a_one_line_error_naming_it(photos, capsys):
    from reclip_ray.cli import main

    (photos / "shard-00009.parquet").write_bytes(b"a download that failed halfway")
    assert main(["data", "shrink", str(photos), "--sizes", "40", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reclip-ray: error: ") and "shard-00009.parquet: not a readable Parquet file" in err
    assert "\n" not in err and "Traceback" not in err


@pytest.mark.slow
def test_shrink_on_ray_writes_what_the_process_pool_writes(ray_session, photos, tmp_path, capsys):
    """`data shrink --ray`: one Ray task per shard on the session's cluster. The shards it writes hold the same
    copies, byte for byte, as the process pool's from the same source, and it reports the same counts; a shard
    that is not Parquet ends it with the same one-line error (raised in a Ray task, unwrapped), and no temp file
    is left behind."""
    import shutil

    from reclip_ray.cli import main

    pooled, on_ray = tmp_path / "pooled", tmp_path / "on_ray"
    shutil.copytree(photos, pooled)
    shutil.copytree(photos, on_ray)
    expected = shrink_dataset(pooled, [40, 80], workers=1, log=None)
    assert main(["data", "shrink", str(on_ray), "--sizes", "40,80", "--ray"]) == 0
    summary = json.loads(capsys.readouterr().out)
    keys = ("shards", "rows", "shards_skipped", "copies_made", "bad_images", "bytes_per_sample")
    assert {k: summary[k] for k in keys} == {k: expected[k] for k in keys}
    for a, b in zip(list_parquet_files(str(pooled)), list_parquet_files(str(on_ray)), strict=True):
        assert Path(a).name == Path(b).name
        for column in ("image_40", "image_80", "key"):
            assert pq.read_table(a, columns=[column]).equals(pq.read_table(b, columns=[column])), (b, column)

    (on_ray / "shard-00009.parquet").write_bytes(b"a download that failed halfway")
    assert main(["data", "shrink", str(on_ray), "--sizes", "40,80", "--ray", "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("reclip-ray: error: ") and "shard-00009.parquet: not a readable Parquet file" in err
    assert not [f for f in os.listdir(on_ray) if "tmp" in f]  # tasks cancelled mid-write removed their temp files
    shards = [f for f in list_parquet_files(str(on_ray)) if "00009" not in f]
    assert [s.copies for s in read_footers(shards)] == [(40, 80)] * 3  # each shard whole: old or rewritten


def test_stale_and_missing_copies_fall_back_to_the_full_image(photos):
    files = list_parquet_files(str(photos))
    shrink_dataset(photos, [40, 80], workers=1, log=None)
    # Another tool drops five rows but keeps our columns and metadata: the copies no longer match the footer.
    table = pq.read_table(files[1])
    pq.write_table(table.slice(0, table.num_rows - 5), files[1])
    _write(Path(files[2]), [_photo(np.random.default_rng(5), 240, 200) for _ in range(12)], 24)  # never shrunk
    shards = read_footers(files)
    assert shards[1].copies == () and shards[1].stale_copies == (40, 80)
    assert shards[2].copies == () and shards[2].stale_copies == ()

    choice = choose_sources(shards, 64, train=True, image_column="image")
    assert choice.columns == {files[0]: "image_80", files[1]: "image", files[2]: "image"}
    assert (choice.missing, choice.stale) == (1, 1)
    assert choice.summary() == "image in 2 shards, image_80 in 1 shard (full image: 1 without a copy that covers it; " \
                               "1 with stale copies)"
    # `data inspect` says the same before any run.
    from reclip_ray.data.inspect import inspect_dataset

    report = inspect_dataset(str(photos))["copies"]
    assert report == {"sizes": {"40": {"shards": 1, "stale": 1}, "80": {"shards": 1, "stale": 1}},
                      "shards_without_copies": 1}


def test_the_smallest_covering_copy_is_chosen():
    shards = [Shard("a", 10, (10,), copies=(40, 80)), Shard("b", 10, (10,), copies=(40,))]
    pick = lambda size, train=True, use=True: choose_sources(shards, size, train=train, image_column="image",
                                                            use_copies=use).columns
    assert pick(32) == {"a": "image_40", "b": "image_40"}
    assert pick(36) == {"a": "image_40", "b": "image_40"}  # a 36 px train crop needs a 40 px source ...
    assert pick(37) == {"a": "image_80", "b": "image"}  # ... and a 37 px one 41.1 px
    assert pick(64) == {"a": "image_80", "b": "image"}
    assert pick(112) == {"a": "image", "b": "image"}
    assert pick(80, train=False) == {"a": "image_80", "b": "image"}  # eval crops the whole shorter side
    assert pick(32, use=False) == {"a": "image", "b": "image"}
    assert choose_sources(shards, 112, train=True, image_column="image").missing == 2


def test_min_source_side_bounds_every_train_crop():
    rng = np.random.default_rng(0)
    for w, h in ((300, 300), (400, 300), (300, 400), (600, 300), (257, 311)):
        shortest = min(min(b[2] - b[0], b[3] - b[1]) for b in (_crop_box(w, h, train=True, rng=rng) for _ in range(4000)))
        factor = 64 / min_source_side(64, train=True)
        assert shortest >= factor * min(w, h) - 1e-6, (w, h)
        if w == h:
            assert shortest <= (factor + 0.01) * min(w, h)  # and the bound is tight, not a loose guess
    assert min_source_side(64, train=False) == 64


# Mean |full crop - copy crop| (of 255 levels) over the 40 photos below, measured: 1.95 (32 px from 40) and 1.41
# (64 px from 80) with the row's RNG; 4.57-4.63 when the copy's crop comes from another epoch's RNG or from the
# row's stream one draw later (the crops differ by a few percent of the image: scale 0.9-1.0, near-square aspect).
# A bound half-way keeps a margin of more than one level on both sides.
CROP_DIFF_BOUND = 3.0


@pytest.mark.parametrize("size,copy", [(32, 40), (64, 80)])
def test_crops_from_a_copy_match_crops_from_the_full_image(size, copy):
    """Same row RNG -> same relative crop box: the copy's crops agree with the original's pixel for pixel up to
    resampling and JPEG error (closer than any other crop box of the RNG's range would), and their statistics agree
    closely."""
    rng = np.random.default_rng(1)
    diffs, full_means, copy_means = [], [], []
    for i in range(40):
        data = _photo(rng, int(rng.integers(240, 520)), int(rng.integers(240, 520)))
        small = make_copy(data, copy)
        a = decode_image(data, size, train=True, rng=row_rng(0, f"k{i}", 0)).astype(np.float32)
        b = decode_image(small, size, train=True, rng=row_rng(0, f"k{i}", 0)).astype(np.float32)
        diffs.append(np.abs(a - b).mean())
        full_means.append(a.mean(axis=(0, 1)))
        copy_means.append(b.mean(axis=(0, 1)))
    assert np.mean(diffs) < CROP_DIFF_BOUND, np.mean(diffs)
    assert np.abs(np.mean(full_means, axis=0) - np.mean(copy_means, axis=0)).max() < 1.0
    assert np.abs(np.std(full_means, axis=0) - np.std(copy_means, axis=0)).max() < 1.0


def _negative_copy(data: bytes, size: int, quality: int = 90) -> bytes:
    """A real copy with its colours inverted: pixels that show which column a decode read."""
    img = Image.open(io.BytesIO(make_copy(data, size, quality)))
    buf = io.BytesIO()
    Image.fromarray(255 - np.asarray(img.convert("RGB"))).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def test_read_groups_reads_the_chosen_column_with_the_same_rows(photos, tmp_path, monkeypatch):
    """The phase reads each shard from the column ``choose_sources`` picked, with the same rows, keys and crops.
    The copies here are negatives of the originals, so a read of the full image instead shows in the pixels."""
    monkeypatch.setattr(copies_mod, "make_copy", _negative_copy)
    shrink_dataset(photos, [40], workers=1, log=None)
    files = list_parquet_files(str(photos))
    shards = read_footers(files)
    tok = train_tokenizer(str(photos), vocab_size=300).to_json()

    def rows(sources):
        stream = PhaseStream(shards, seed=3, passes=1, group_shards=2, chunk_rows=5, sources=sources)
        out = []
        for item in stream.items():
            for table in read_groups(pa.Table.from_pylist([item]), columns=ColumnMap(), chunk_rows=5, seed=3):
                batch = {k: np.asarray(v.to_numpy(zero_copy_only=False)) for k, v in zip(table.column_names, table.columns)}
                out.append((table.column("key").to_pylist(), table.column("_pos").to_pylist(),
                            decode_batch(batch, image_size=32, text_length=8, tokenizer_json=tok, train=True, seed=3)))
        return out

    full = rows(None)
    chosen = choose_sources(shards, 32, train=True, image_column="image").columns
    assert set(chosen.values()) == {"image_40"}
    small = rows(chosen)
    assert [(k, p) for k, p, _ in full] == [(k, p) for k, p, _ in small]
    for (_, _, a), (_, _, b) in zip(full, small):
        assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["_ok"], b["_ok"])
        a, b = a["image"].astype(float), b["image"].astype(float)
        assert np.abs((255 - a) - b).mean() < 8.0  # the negative copy, cropped as the original
        assert np.abs(a - b).mean() > 40.0  # not the original


def test_bad_arguments_are_one_line_errors(photos):
    with pytest.raises(DataError, match="comma-separated integers"):
        parse_sizes("40,eighty")
    with pytest.raises(DataError, match=">= 8 px"):
        parse_sizes("4")
    with pytest.raises(DataError, match=r"shard-00000\.parquet: no column 'jpg' to shrink .*--image-column"):
        shrink_dataset(photos, [40], image_column="jpg", workers=1, log=None)
    assert copy_column("jpg", 80) == "jpg_80"


def test_synth_with_shrink_from_the_cli(tmp_path, capsys):
    from reclip_ray.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--train", "30", "--eval", "10", "--shard-rows", "10",
                 "--shrink", "40,80"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["copies"]["shards"] == 3 and out["copies"]["copies_made"] == 60
    assert [s.copies for s in read_footers(list_parquet_files(str(tmp_path / "d" / "train")))] == [(40, 80)] * 3
    assert not any(name.startswith("image_") for name in pq.read_schema(
        list_parquet_files(str(tmp_path / "d" / "eval"))[0]).names)
    assert os.path.exists(tmp_path / "d" / "train" / "dataset.json")
