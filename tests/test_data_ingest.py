"""Ingest round trips (folder + CSV/JSONL, webdataset tars), atomic shards, and the errors users will hit."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reclip_ray.data.ingest import ShardWriter, expand_braces, ingest_folder, ingest_webdataset
from reclip_ray.data.schema import ColumnMap, check_schema, read_dataset_json
from reclip_ray.data.shards import list_parquet_files
from reclip_ray.errors import DataError


def _image_bytes(i: int, fmt: str) -> bytes:
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


FORMATS = ["JPEG", "PNG", "WEBP"]
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _read_all(out) -> list[dict]:
    rows = []
    for f in list_parquet_files(str(out)):
        rows += pq.read_table(f).to_pylist()
    return rows


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    records = []
    for i in range(7):
        fmt = FORMATS[i % 3]
        rel = f"sub/img{i}.{EXT[fmt]}" if i % 2 else f"img{i}.{EXT[fmt]}"
        data = _image_bytes(i, fmt)
        (folder / rel).write_bytes(data)
        records.append({"file": rel, "caption": f"caption number {i}", "label": i % 3, "bytes": data})
    return folder, records


def _check_round_trip(out, records, labels=True):
    rows = _read_all(out)
    assert [r["caption"] for r in rows] == [r["caption"] for r in records]
    assert [r["image"] for r in rows] == [r["bytes"] for r in records]  # stored exactly, not re-encoded
    for row, rec in zip(rows, records):
        w, h = Image.open(io.BytesIO(rec["bytes"])).size
        assert (row["width"], row["height"]) == (w, h)
        if labels:
            assert row["label"] == rec["label"]
    assert len({r["key"] for r in rows}) == len(rows)
    assert len(list_parquet_files(str(out))) == 3  # 7 rows, 3 per shard
    assert read_dataset_json(out)["rows"] == len(records)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_folder_csv_round_trip(tmp_path, image_folder):
    folder, records = image_folder
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "caption", "label"])
        w.writeheader()
        for r in records:
            w.writerow({k: r[k] for k in ("file", "caption", "label")})
    summary = ingest_folder(str(folder), str(captions), str(tmp_path / "out"), shard_rows=3)
    assert summary["rows"] == 7 and summary["skipped"] == 0
    _check_round_trip(tmp_path / "out", records)


def test_folder_jsonl_round_trip_skips_unusable(tmp_path, image_folder):
    folder, records = image_folder
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    lines = [{"file": r["file"], "caption": r["caption"]} for r in records]
    lines.insert(2, {"file": "broken.jpg", "caption": "unreadable header"})
    lines.insert(4, {"file": records[0]["file"], "caption": "   "})
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    summary = ingest_folder(folder, captions, tmp_path / "out", shard_rows=3)
    assert summary["rows"] == 7 and summary["skipped"] == 2
    reasons = {e["reason"] for e in summary["skipped_examples"]}
    assert "empty caption" in reasons and any("identify" in r for r in reasons)
    assert summary["skipped_examples"][0]["row"] == 3
    _check_round_trip(tmp_path / "out", records, labels=False)


def test_folder_keeps_extra_label_sets_as_int32(tmp_path, image_folder):
    """``label_<set>`` columns (an eval set's extra label sets, dataset.json ``label_sets``) pass through as int32;
    a row that lacks one the first row had is an error naming the row and the column."""
    folder, records = image_folder
    lines = [{"file": r["file"], "caption": r["caption"], "label": r["label"], "label_colour": str(i * 2)}
             for i, r in enumerate(records)]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    ingest_folder(folder, captions, tmp_path / "out", shard_rows=3)
    files = list_parquet_files(str(tmp_path / "out"))
    assert str(pq.read_schema(files[0]).field("label_colour").type) == "int32"
    assert [r["label_colour"] for r in _read_all(tmp_path / "out")] == [i * 2 for i in range(len(records))]
    del lines[3]["label_colour"]
    captions.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    with pytest.raises(DataError, match=r"captions\.jsonl row 4: missing 'label_colour'"):
        ingest_folder(folder, captions, tmp_path / "out2", shard_rows=3)


def test_folder_errors_name_file_row_and_column(tmp_path, image_folder):
    folder, records = image_folder
    bad_csv = tmp_path / "nocaption.csv"
    bad_csv.write_text("file,text\nimg0.jpg,hello\n")
    with pytest.raises(DataError, match=r"nocaption\.csv: missing column 'caption'"):
        ingest_folder(folder, bad_csv, tmp_path / "o1")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"file": "img0.jpg", "caption": "ok"}) + "\n" + json.dumps({"file": "nope.jpg", "caption": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing\.jsonl row 2: image file not found: .*nope\.jpg"):
        ingest_folder(folder, missing, tmp_path / "o2")
    nocap = tmp_path / "nocap.jsonl"
    nocap.write_text(json.dumps({"file": "img0.jpg"}) + "\n")
    with pytest.raises(DataError, match=r"nocap\.jsonl row 1: missing 'caption'"):
        ingest_folder(folder, nocap, tmp_path / "o3")
    with pytest.raises(DataError, match="captions file not found"):
        ingest_folder(folder, tmp_path / "absent.csv", tmp_path / "o4")


def test_folder_captions_with_a_byte_order_mark_or_not_utf8(tmp_path, image_folder, monkeypatch):
    """Excel's "CSV UTF-8" starts with a byte-order mark (it used to become part of the first column's name, and a
    JSON error); a Latin-1 export is a one-line error naming the line and byte, not a UnicodeDecodeError."""
    folder, records = image_folder
    bom = b"\xef\xbb\xbf"
    rows = "".join(f"{r['file']},caf\u00e9 {i}\r\n" for i, r in enumerate(records))
    (tmp_path / "bom.csv").write_bytes(bom + ("file,caption\r\n" + rows).encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes(bom + "".join(
        json.dumps({"file": r["file"], "caption": f"caf\u00e9 {i}"}) + "\n" for i, r in enumerate(records)).encode())
    for name in ("bom.csv", "bom.jsonl"):
        assert ingest_folder(folder, tmp_path / name, tmp_path / name.replace(".", "_"))["rows"] == 7
        captions = [r["caption"] for r in _read_all(tmp_path / name.replace(".", "_"))]
        assert captions == [f"caf\u00e9 {i}" for i in range(7)], name

    # The bad byte far past the text reader's first 8 KB chunk: still the right line and offset.
    good = "".join(f"{records[0]['file']},caption {i}\n" for i in range(1000)).encode()
    latin1 = b"file,caption\n" + good + "img0.jpg,caf\u00e9 au lait\n".encode("latin-1")
    (tmp_path / "latin1.csv").write_bytes(latin1)
    at = latin1.index(b"\xe9")
    with pytest.raises(DataError, match=rf"latin1\.csv line 1002 \(byte {at}, 0xe9\): not UTF-8 text") as err:
        ingest_folder(folder, tmp_path / "latin1.csv", tmp_path / "o1")
    assert "\n" not in str(err.value)
    jsonl = bom + b'{"file": "img0.jpg", "caption": "ok"}\n{"file": "img0.jpg", "caption": "\xe9"}\n'
    (tmp_path / "latin1.jsonl").write_bytes(jsonl)
    with pytest.raises(DataError, match=rf"latin1\.jsonl line 2 \(byte {jsonl.index(0xe9)}, 0xe9\): not UTF-8 text"):
        ingest_folder(folder, tmp_path / "latin1.jsonl", tmp_path / "o2")

    # A remote captions file is read whole and decoded the same way.
    from reclip_ray import storage
    from reclip_ray.data import ingest

    monkeypatch.setattr(storage, "local_path", lambda path: None)
    monkeypatch.setattr(storage, "read_bytes", lambda path, may_change=True: open(path, "rb").read())
    assert [r for _, r in ingest._read_caption_rows(str(tmp_path / "bom.csv"))][0]["file"] == records[0]["file"]
    with pytest.raises(DataError, match=rf"latin1\.csv line 1002 \(byte {at}, 0xe9\)"):
        list(ingest._read_caption_rows(str(tmp_path / "latin1.csv")))


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_round_trip(tmp_path):
    records = []
    for shard in range(3):
        samples = []
        for j in range(3):
            i = shard * 3 + j
            if i == 8:
                break
            fmt = FORMATS[i % 3]
            key = f"{shard:05d}{j:04d}"
            data = _image_bytes(i, fmt)
            samples += [(f"{key}.{EXT[fmt]}", data), (f"{key}.txt", f"tar caption {i}".encode()),
                        (f"{key}.json", json.dumps({"caption": f"tar caption {i}"}).encode())]
            records.append({"caption": f"tar caption {i}", "bytes": data, "key": key})
        _write_tar(tmp_path / f"{shard:05d}.tar", samples)
    pattern = str(tmp_path / "{00000..00002}.tar")
    summary = ingest_webdataset(pattern, str(tmp_path / "out"), shard_rows=3)
    assert summary["rows"] == 8
    rows = _read_all(tmp_path / "out")
    assert [r["key"] for r in rows] == [r["key"] for r in records]
    assert [r["image"] for r in rows] == [r["bytes"] for r in records]
    assert [r["caption"] for r in rows] == [r["caption"] for r in records]

    _write_tar(tmp_path / "bad.tar", [("k1.jpg", records[0]["bytes"])])
    with pytest.raises(DataError, match=r"bad\.tar sample 0 key=k1: missing caption"):
        ingest_webdataset(str(tmp_path / "bad.tar"), str(tmp_path / "out2"))
    with pytest.raises(DataError, match=r"not found: .*00003\.tar \(\+6 more\)"):
        ingest_webdataset(str(tmp_path / "{00000..00009}.tar"), str(tmp_path / "out3"))


def test_expand_braces():
    assert expand_braces("a/{00000..00002}.tar") == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def _row(i):
    return {"key": f"k{i}", "image": b"\x00" * 10, "caption": "c", "width": 1, "height": 1}


def test_shard_writer_interrupted_between_shards_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, shard_rows=3) as w:
            for i in range(5):
                w.add(_row(i))
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["shard-00000.parquet"]
    assert pq.read_table(tmp_path / "shard-00000.parquet").num_rows == 3


def test_shard_writer_interrupted_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real = pq.write_table

    def dying_write(table, where, **kw):
        real(table.slice(0, 1), where, **kw)  # something partial is on disk under the temp name...
        with open(where, "r+b") as f:
            f.truncate(20)
        raise KeyboardInterrupt  # ...when the process is interrupted

    monkeypatch.setattr(pq, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path, shard_rows=2) as w:
            for i in range(3):
                w.add(_row(i))
    assert os.listdir(tmp_path) == []


def test_schema_errors(tmp_path, synth_dir):
    with pytest.raises(DataError, match="no Parquet files under"):
        list_parquet_files(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        list_parquet_files(str(tmp_path / "nowhere"))
    files = list_parquet_files(str(synth_dir / "train"))
    with pytest.raises(DataError, match=r"shard-00000\.parquet: missing image column 'jpg'"):
        check_schema(files, ColumnMap(image="jpg"))
    with pytest.raises(DataError, match=r"missing label column 'label'"):
        check_schema(files, ColumnMap(), require_label=True)
    check_schema(list_parquet_files(str(synth_dir / "eval")), ColumnMap(), require_label=True)
    assert list_parquet_files("file://" + str(synth_dir / "train")) == files
