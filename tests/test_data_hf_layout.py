"""Parquet written by Hugging Face ``datasets`` (``layouts.write_hugging_face``: the library's own ``to_parquet``),
read as it is: image as ``struct<bytes, path>``, class names in the footer's ``huggingface`` metadata, no key.

No Ray: the phase stream is read with ``read_groups`` and ``decode_batch``, the functions Ray Data runs (the Ray
wrapper only maps them over the items), and every count and pixel is checked against the writer's own record.
Evaluation with the ClassLabel names is in ``test_eval_layouts.py`` (it has the stub model).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from layouts import write_hugging_face
from reclip_ray.data.copies import choose_sources, shrink_dataset
from reclip_ray.data.images import decode_image
from reclip_ray.data.inspect import inspect_dataset
from reclip_ray.data.local import BadRowCount, iter_local_batches
from reclip_ray.data.pipeline import decode_batch, read_groups
from reclip_ray.data.schema import ColumnMap, check_schema, class_label_sets
from reclip_ray.data.shards import clear_footer_cache, list_parquet_files, read_footers
from reclip_ray.data.stream import OK, PhaseStream
from reclip_ray.data.tokenizer import train_tokenizer
from reclip_ray.errors import DataError


@pytest.fixture
def hf(tmp_path):
    clear_footer_cache()
    return write_hugging_face(tmp_path / "hf")


def test_the_writer_is_the_datasets_layout(hf):
    """Guards the fixture: what ``datasets`` wrote is the layout these tests are about."""
    schema = pq.read_schema(hf.files[0])
    assert str(schema.field("image").type) == "struct<bytes: binary, path: string>"
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": hf.extra["classes"], "_type": "ClassLabel"}
    assert "key" not in schema.names and pa.types.is_int64(schema.field("label").type)


def test_schema_check_accepts_it_and_hints_at_a_struct_image_column(hf, tmp_path):
    check_schema(hf.files, ColumnMap())
    assert class_label_sets(hf.files) == {"label": hf.extra["classes"], "colour": hf.extra["colours"]}
    cifar = write_hugging_face(tmp_path / "cifar", image_column="img", n_rows=4, null=(), path_only=(), corrupt=())
    with pytest.raises(DataError, match=r"missing image column 'image'.*try --set data.image_column=img"):
        check_schema(cifar.files, ColumnMap())


def test_images_stored_by_path_only_fail_the_check_in_one_line(tmp_path):
    rows = 6
    paths = write_hugging_face(tmp_path / "paths", n_rows=rows, null=(), path_only=tuple(range(rows)), corrupt=())
    with pytest.raises(DataError, match=r"no image bytes in any of the 6 rows of 'image'.*embed_table_storage"):
        check_schema(paths.files, ColumnMap())
    from reclip_ray.evaluation.eval_set import check_eval_set

    with pytest.raises(DataError, match=r"no image bytes in any of the 6 rows"):  # an eval set: before any model
        check_eval_set(str(paths.path), ColumnMap(), [32], 16)


def test_footer_counts_null_structs_and_null_bytes_as_absent(hf):
    """The phase stream's absent count comes from the footer: the struct's ``bytes`` leaf statistics."""
    footers = read_footers(hf.files)
    expected = [sum(k.startswith(f.split("/")[-1] + "#") for k in hf.absent_keys) for f in hf.files]
    assert [s.absent for s in footers] == expected and sum(expected) == 2 and all(expected)
    from reclip_ray.data.shards import footers as raw_footers

    first, second = raw_footers(hf.files)
    assert first.class_labels is second.class_labels  # one parsed tuple per distinct metadata entry, not per shard


def expected_pixels(hf, key: str, size: int) -> np.ndarray:
    return decode_image(hf.extra["images"][key], size, train=False)


def test_local_reader_decodes_the_struct_images(hf):
    counts = BadRowCount()
    batches = list(iter_local_batches(str(hf.path), image_size=24, text_length=8, tokenizer=_Tokenizer(),
                                      batch_size=4, bad_rows=counts, extra_columns=("label",)))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(hf.valid_keys)
    assert (counts.absent, counts.bad) == (len(hf.absent_keys), len(hf.bad_keys))
    for b in batches:
        for key, image, label in zip(b["key"], b["image"], b["label"]):
            assert np.array_equal(image, expected_pixels(hf, key, 24)), key
            assert label == hf.extra["labels"][key]


class _Tokenizer:
    def encode(self, texts, length):
        return np.zeros((len(texts), length), np.int64)


def phase_rows(hf, tokenizer_json: str, sources=None, size: int = 24) -> dict[str, np.ndarray]:
    """{key: decoded image} of one pass read as the Ray pipeline reads it; checks the stream's absent/bad counts."""
    stream = PhaseStream(read_footers(hf.files), seed=1, passes=1, group_shards=2, chunk_rows=3, sources=sources)
    images, absent, bad = {}, 0, []
    for item in stream.items():
        for table in read_groups(pa.Table.from_pylist([item]), columns=ColumnMap(), chunk_rows=3, seed=1):
            absent += int(table.column("_unit_absent")[0].as_py())
            batch = {c: np.asarray(table.column(c).to_numpy(zero_copy_only=False)) for c in table.column_names}
            out = decode_batch(batch, image_size=size, text_length=8, tokenizer_json=tokenizer_json, train=False,
                               seed=1, keep_keys=True)
            for key, ok, image in zip(out["key"], out["_ok"], out["image"]):
                if ok == OK:
                    images[key] = image
                else:
                    bad.append(key)
    assert (absent, sorted(bad)) == (len(hf.absent_keys), sorted(hf.bad_keys))
    return images


def test_phase_stream_reads_the_struct_images(hf):
    tok = train_tokenizer(str(hf.path), vocab_size=300).to_json()
    images = phase_rows(hf, tok)
    assert sorted(images) == sorted(hf.valid_keys)
    for key, image in images.items():
        assert np.array_equal(image, expected_pixels(hf, key, 24)), key


def test_inspect_reports_rows_absent_bad_and_class_labels(hf):
    report = inspect_dataset(str(hf.path))
    assert (report["rows"], report["rows_absent"], report["rows_bad"]) == (hf.rows, hf.absent, hf.bad)
    assert report["image_size"]["width"]["min"] >= 48
    assert report["class_labels"] == {"label": {"classes": 3, "class_examples": hf.extra["classes"]},
                                      "colour": {"classes": 4, "class_examples": hf.extra["colours"]}}


def test_inspect_reads_a_class_only_eval_set_without_captions(tmp_path):
    """An image + label export (no caption column, as CIFAR's or ImageNet's) is a zero-shot eval set: ``data
    inspect`` checks its images and lists its label sets, and says it has no captions, where it used to stop at the
    missing caption column. A set whose captions have another name still stops, naming the flag."""
    from layouts import write_img2dataset

    labels_only = write_hugging_face(tmp_path / "cifar", caption_column=None)
    report = inspect_dataset(str(labels_only.path))
    assert report["captions"].startswith("none: no 'caption' or other caption column in any shard")
    assert (report["rows"], report["rows_absent"], report["rows_bad"]) == (
        labels_only.rows, labels_only.absent, labels_only.bad)
    assert report["bad_reasons"] == {"cannot open image": labels_only.bad}  # images only: no "empty caption"
    assert set(report["class_labels"]) == {"label", "colour"}
    assert "captions" not in inspect_dataset(str(write_hugging_face(tmp_path / "captioned").path))
    txt = write_img2dataset(tmp_path / "txt", 6, seed=2, shards=1, caption_column="txt")
    with pytest.raises(DataError, match=r"missing caption column 'caption'.*try --set data\.caption_column=txt"):
        inspect_dataset(str(txt.path), image_column="jpg")


def test_shrunk_copies_are_binary_columns_read_by_the_phase_and_datasets_still_loads_the_shard(hf, tmp_path):
    """Copies of a struct image column are plain binary columns made from its bytes; the struct and the
    ``huggingface`` metadata stay, so ``datasets`` loads the shrunk shard with its ClassLabels and images."""
    from datasets import Dataset

    out = tmp_path / "shrunk"
    summary = shrink_dataset(str(hf.path), [40], out=str(out), workers=1, log=None)
    assert summary["copies_made"] == len(hf.valid_keys) and summary["bad_images"] == len(hf.bad_keys)
    stored = [r["image"]["bytes"] for f in hf.files for r in pq.read_table(f).to_pylist() if r["image"]]
    mean = sum(len(b) for b in stored if b) / hf.rows
    # the struct's bytes leaf (not 0 for want of a leaf named "image"): the bytes plus page headers and statistics
    assert mean <= summary["full_bytes_per_sample"] < 2 * mean and summary["bytes_per_sample"]["40"] > 0
    files = list_parquet_files(str(out))
    table = pq.read_table(files[0])
    assert pa.types.is_binary(table.schema.field("image_40").type)
    assert pa.types.is_struct(table.schema.field("image").type)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        key = f"{files[0].split('/')[-1]}#{i}"
        if key in hf.absent_keys:
            assert row["image_40"] is None  # an absent row stays absent in the copy
        elif key in hf.bad_keys:
            assert row["image_40"] == row["image"]["bytes"]  # fails to decode as the original does
        else:
            assert min(Image.open(io.BytesIO(row["image_40"])).size) == 40
    assert {k.split("#")[0] for k in hf.bad_keys} == {files[0].split("/")[-1]}  # the loop saw every kind of row
    loaded = Dataset.from_parquet(files[0])
    assert loaded.features["label"].names == hf.extra["classes"]
    first = int(hf.valid_keys[0].split("#")[1])  # a row of files[0]
    assert loaded[first]["image"].size == Image.open(io.BytesIO(hf.extra["images"][hf.valid_keys[0]])).size
    clear_footer_cache()
    shrunk = type(hf)(out, files, "image", "caption", hf.valid_keys, hf.absent_keys, hf.bad_keys, hf.extra)
    shards = read_footers(files)
    assert all(s.copies == (40,) for s in shards) and [s.absent for s in shards] == [1, 1]
    sources = choose_sources(shards, 32, train=False, image_column="image")
    assert sources.counts == {"image_40": 2}
    tok = train_tokenizer(str(out), vocab_size=300).to_json()
    images = phase_rows(shrunk, tok, sources.columns, size=32)
    assert sorted(images) == sorted(hf.valid_keys)
    for key, image in images.items():  # the copy's pixels, not the full image's: close, not equal
        assert np.abs(image.astype(float) - expected_pixels(hf, key, 32).astype(float)).mean() < 8.0, key


def test_a_hub_folder_with_several_splits_is_refused_and_a_pattern_names_one(tmp_path):
    """``push_to_hub`` puts every split in one ``data/`` folder: pointing ``data.train`` (or ``eval --data``) at
    it would have trained on the test split, silently. The folder is refused in one line naming a pattern, and
    the pattern lists that split only, through the launch's checks (``prepare``: schema, eval set, tokenizer)."""
    from reclip_ray.config import load_config
    from reclip_ray.train.prepare import prepare

    train = write_hugging_face(tmp_path / "hub", n_rows=12, shards=2, null=(), path_only=(), corrupt=())
    test = write_hugging_face(tmp_path / "hub", n_rows=6, shards=1, null=(), path_only=(), corrupt=(), split="test",
                              seed=1)
    data = tmp_path / "hub" / "data"
    with pytest.raises(DataError) as refused:
        list_parquet_files(str(data))
    assert str(refused.value) == (f"{data} holds the splits train, test of a Hugging Face export side by side: "
                                  f"using them all would mix them; name one, e.g. {data}/train-*.parquet (or all "
                                  f"of them: {data}/*.parquet)")
    assert list_parquet_files(f"{data}/train-*.parquet") == train.files
    assert list_parquet_files(f"{data}/test-0000?-of-*.parquet") == test.files
    assert len(list_parquet_files(f"{data}/*.parquet")) == 3  # a pattern is the user's choice: no refusal
    with pytest.raises(DataError, match=r"no Parquet files match .*/validation-\*\.parquet$"):
        list_parquet_files(f"{data}/validation-*.parquet")
    assert inspect_dataset(f"{data}/test-*.parquet")["rows"] == 6

    cfg = load_config("tiny", [
        f"data.train={data}/train-*.parquet", f"data.eval={data}/test-*.parquet", "data.tokenizer=",
        "data.synth_if_missing=false", f"run.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    prep = prepare(cfg)
    assert (prep.cfg.data.train, prep.cfg.data.eval) == (f"{data}/train-*.parquet", f"{data}/test-*.parquet")
