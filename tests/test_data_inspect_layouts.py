"""Layouts other tools write (tests/layouts.py): inspect counts, absent rows, and the column/webdataset hints.

Expected counts come from the writers (how many rows they made failed or corrupt), never from reading the files
back with the code under test.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layouts import write_img2dataset, write_labelled_folder_dataset, write_messy, write_webdataset_sibling
from reclip_ray.cli import main
from reclip_ray.data.ingest import ingest_webdataset
from reclip_ray.data.inspect import inspect_dataset
from reclip_ray.data.schema import ColumnMap, absent_mask, check_schema
from reclip_ray.data.shards import list_parquet_files
from reclip_ray.errors import DataError


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    """50 rows over 2 shards: 15 failed downloads (30%), 4 corrupt images among the successes."""
    return write_img2dataset(tmp_path_factory.mktemp("i2d") / "out", 50, failed_fraction=0.3, corrupt=4, seed=3)


def _inspect_cli(capsys, *argv: str) -> dict:
    assert main(["data", "inspect", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_img2dataset_inspect_counts_absent_apart_from_bad(i2d, capsys):
    report = _inspect_cli(capsys, str(i2d.path), "--image-column", "jpg")
    assert (report["rows"], report["rows_absent"], report["rows_bad"]) == (50, 15, 4)
    assert report["bad_rows"] == 4 and report["shards"] == 2
    assert report["bad_fraction"] == pytest.approx(4 / 35, abs=1e-6)  # a share of the 35 samples, not of 50 rows
    assert {e["key"] for e in report["bad_examples"]} == set(i2d.bad_keys)
    assert not {e["key"] for e in report["bad_examples"]} & set(i2d.absent_keys)
    assert set(report["bad_reasons"]) <= {"truncated image", "cannot identify image", "cannot open image",
                                          "cannot decode image"}
    assert report["columns"]["jpg"] == "binary" and report["columns"]["tags"] == "list<element: string>"


def test_img2dataset_txt_captions_with_null_cells(tmp_path):
    layout = write_img2dataset(tmp_path / "d", 20, failed_fraction=0.5, seed=1, shards=1, extra_columns=False,
                               caption_column="txt")
    report = inspect_dataset(str(layout.path), image_column="jpg", caption_column="txt")
    assert (report["rows"], report["rows_absent"], report["rows_bad"]) == (20, 10, 0)  # null txt on absent rows only


def test_missing_columns_suggest_the_set_flags(tmp_path, i2d):
    with pytest.raises(DataError, match=r"00000\.parquet: missing image column 'image'; .*\(try --set "
                                        r"data\.image_column=jpg\)$"):
        check_schema(i2d.files, ColumnMap())
    txt = write_img2dataset(tmp_path / "txt", 6, seed=2, shards=1, caption_column="txt")
    with pytest.raises(DataError) as err:
        check_schema(txt.files, ColumnMap())
    assert "missing image column 'image'" in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).endswith("(try --set data.image_column=jpg; try --set data.caption_column=txt)")
    with pytest.raises(DataError, match=r"missing caption column 'caption'; .*\(try --set data\.caption_column=txt\)"):
        check_schema(txt.files, ColumnMap(image="jpg"))
    with pytest.raises(DataError, match=r"image column 'url' has type string, expected binary \(try --set "
                                        r"data\.image_column=jpg\)"):
        check_schema(i2d.files, ColumnMap(image="url"))
    check_schema(i2d.files, ColumnMap(image="jpg"))  # img2dataset's own caption column is the default name


def test_missing_column_without_candidates_names_the_flag_to_name_it(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"key": ["a"], "caption": ["x"], "url": ["http://x"]}), tmp_path / "d" / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: missing image column 'image'; columns are \['caption', 'key', "
                                        r"'url'\] \(name it with --set data\.image_column=COLUMN\)$"):
        check_schema(list_parquet_files(str(tmp_path / "d")), ColumnMap())
    assert main(["data", "inspect", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.rstrip().endswith("(name it with --image-column COLUMN)")


def test_data_inspect_hints_name_its_own_options_which_then_work(i2d, tmp_path, capsys):
    """`data inspect` has --image-column / --caption-column, not train's --set: its hints name those, and the
    command given the hinted flags inspects the set."""
    from reclip_ray.cli import build_parser

    txt = write_img2dataset(tmp_path / "txt", 6, seed=2, shards=1, caption_column="txt")
    both = ["--image-column", "jpg", "--caption-column", "txt"]
    for layout, rows, hinted in ((i2d, 50, ["--image-column", "jpg"]), (txt, 6, both)):
        argv = ["data", "inspect", str(layout.path)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--set" not in err
        flags = re.findall(r"try (--[\w-]+) (\S+?)[;)]", err)
        assert [x for pair in flags for x in pair] == hinted, err
        build_parser().parse_args(argv + hinted)  # flags the same command's parser takes
        assert _inspect_cli(capsys, *argv[2:], *hinted)["rows"] == rows
    assert main(["data", "inspect", str(i2d.path), "--image-column", "url"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("has type string, expected binary (try --image-column jpg)")


def test_data_tokenizer_hint_names_its_own_caption_flag_which_then_works(tmp_path, capsys):
    """`data tokenizer` reads the captions on the tokenizers library's threads, where a ``column_flag`` block of the
    command would be unset: its hint names --caption-column because the command passes the flag, and the command
    given that flag trains. Train's callers, passing none, keep train's --set hint."""
    from reclip_ray.data.tokenizer import train_tokenizer

    txt = write_img2dataset(tmp_path / "txt", 6, seed=2, shards=1, caption_column="txt")
    argv = ["data", "tokenizer", "--data", str(txt.path), "--vocab-size", "300", "--out", str(tmp_path / "tok.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--set" not in err, err
    assert re.search(r"00000\.parquet: missing caption column 'caption'; .*\(try --caption-column txt\)$", err), err
    assert main(argv + ["--caption-column", "txt"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 300
    with pytest.raises(DataError, match=r"\(try --set data\.caption_column=txt\)$"):
        train_tokenizer(txt.path, vocab_size=300)


def test_webdataset_sibling_error_names_a_command_that_works(tmp_path, capsys):
    layout = write_webdataset_sibling(tmp_path / "wds", n_rows=14, shards=2, seed=4)
    for columns in (ColumnMap(), ColumnMap(image="jpg", caption="txt")):
        with pytest.raises(DataError) as err:
            check_schema(layout.files, columns)
        message = str(err.value)
        assert "\n" not in message and "reclip-ray data ingest --webdataset" in message
    assert f"'{layout.path}/{{00000..00001}}.tar' --out DIR" in message
    pattern = re.search(r"--webdataset '([^']+)'", message).group(1)
    summary = ingest_webdataset(pattern, tmp_path / "ingested")  # the command the error names really converts it
    assert summary["rows"] == len(layout.valid_keys) == 14 - layout.absent

    assert main(["data", "inspect", str(layout.path)]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "--webdataset" in err_lines[0] and "Traceback" not in err_lines[0]


def test_metadata_only_parquet_without_tars_still_points_to_ingest(tmp_path):
    layout = write_webdataset_sibling(tmp_path / "wds", n_rows=6, seed=5)
    os.remove(tmp_path / "wds" / "00000.tar")  # tars kept elsewhere: img2dataset's metadata columns still tell
    with pytest.raises(DataError, match=r"ingest --webdataset '.*/wds/00000\.tar' --out DIR"):
        check_schema(layout.files, ColumnMap())


def test_absent_mask_table_batches_and_numpy(i2d):
    absent_keys = set()
    for file in i2d.files:
        table = pq.read_table(file)
        mask = absent_mask(table, "jpg")
        assert mask.dtype == bool and len(mask) == table.num_rows
        keys = np.array(table.column("key").to_pylist())
        absent_keys |= set(keys[mask])
        numpy_batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("jpg", "status", "key")}
        assert np.array_equal(absent_mask(numpy_batch, "jpg"), mask)
        assert np.array_equal(absent_mask(table.to_batches()[0], "jpg"), mask[: table.to_batches()[0].num_rows])
        assert np.array_equal(absent_mask(table.select(["key", "jpg", "caption"]).to_pandas(), "jpg"), mask)
    assert absent_keys == set(i2d.absent_keys)

    # status alone marks a row absent; a non-string status column is not img2dataset's and is ignored
    t = pa.table({"image": [b"x", b"y", None], "status": ["success", "failed_to_resize", "success"]})
    assert absent_mask(t).tolist() == [False, True, True]
    assert absent_mask(t.set_column(1, "status", pa.array([0, 1, 2]))).tolist() == [False, False, True]
    assert absent_mask({"image": np.array([b"x", b"y"], dtype=object), "status": np.array([3, 4])}).tolist() == [False, False]
    assert absent_mask(t.slice(0, 0)).tolist() == [] and absent_mask({}).tolist() == []


def test_a_status_column_of_the_users_own_hides_no_row(tmp_path):
    """Only img2dataset's failures ("failed_to_...") make a row absent, one row at a time: a dataset with its own
    ``status`` ("published", "draft", None) kept every row as a sample before it lost them all (the old rule: any
    string other than "success"), or only some, depending on which rows shared a batch."""
    from layouts import photo

    status = ["published", "draft", None, "published", "failed_to_resize", "success", "published"]
    images = [photo(np.random.default_rng(i), 24, 20, "PNG") for i in range(len(status))]
    images[3] = None  # a null image is absent whatever its status says
    expected = [False, False, False, True, True, False, False]
    table = pa.table({"image": pa.array(images, pa.binary()), "caption": [f"c{i}" for i in range(len(status))],
                      "status": pa.array(status, pa.string())})
    assert absent_mask(table).tolist() == expected
    assert absent_mask(table.to_batches(max_chunksize=2)[1]).tolist() == expected[2:4]
    assert absent_mask(table.set_column(2, "status", table.column("status").dictionary_encode())).tolist() == expected
    numpy_batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    assert absent_mask(numpy_batch).tolist() == expected
    assert absent_mask(table.to_pandas()).tolist() == expected
    # the same row is absent or not whichever rows share its batch: a batch of one row each agrees with the whole
    assert [bool(absent_mask({c: v[i:i + 1] for c, v in numpy_batch.items()})[0]) for i in range(7)] == expected
    not_strings = {"image": numpy_batch["image"][:3], "status": np.array([None, None, 3], dtype=object)}
    assert absent_mask(not_strings).tolist() == [False, False, False]

    pq.write_table(table, tmp_path / "part-0.parquet")
    report = inspect_dataset(str(tmp_path))
    assert (report["rows"], report["rows_absent"], report["rows_bad"]) == (7, 2, 0)
    assert report["checked_rows"] == 7 and report["image_size"]["width"]["min"] == 24  # five samples decoded


def test_messy_export_inspects_with_absent_and_bad_apart(tmp_path):
    layout = write_messy(tmp_path / "messy", n_rows=16, seed=6)
    report = inspect_dataset(str(layout.path))
    assert (report["rows"], report["rows_absent"], report["rows_bad"]) == (16, layout.absent, layout.bad) == (16, 1, 3)
    assert report["shards"] == 2 and report["bad_reasons"] == {"empty caption": 3}
    assert [e["key"] for e in report["bad_examples"]] == [None] * 3  # no key column: file and row name the rows
    assert report["columns"]["fetched"] == "timestamp[us, tz=UTC]"
    assert report["image_size"]["width"]["min"] == 1  # the 1-pixel-wide image decodes: a sample, not a bad row


def test_labelled_folder_dataset_is_canonical(tmp_path):
    layout = write_labelled_folder_dataset(tmp_path / "lab", n_rows=9, shard_rows=4)
    check_schema(layout.files, ColumnMap(), require_label=True)
    table = pa.concat_tables(pq.read_table(f) for f in layout.files)
    assert table.schema.field("label").type == pa.int32()
    assert dict(zip(table.column("key").to_pylist(), table.column("label").to_pylist())) == layout.extra["labels"]
    report = inspect_dataset(str(layout.path))
    assert (report["rows"], report["rows_absent"], report["rows_bad"], report["shards"]) == (9, 0, 0, 3)


def test_column_types_other_writers_use_pass_the_check_and_decode_as_binary_and_string(tmp_path):
    """Polars writes ``binary_view`` / ``string_view`` (its Binary and String), pandas a ``Categorical`` caption as
    ``dictionary<string>``: the pipeline always read them (it casts), but the launch's schema check refused them.
    Each shard decodes to the pixels and tokens of the same rows stored as plain binary / string."""
    from PIL import Image

    from reclip_ray.data.pipeline import decode_batch, read_groups
    from reclip_ray.data.shards import read_footers
    from reclip_ray.data.stream import PhaseStream
    from reclip_ray.data.tokenizer import train_tokenizer

    def jpeg(colour: str) -> bytes:
        import io

        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, "JPEG")
        return buf.getvalue()

    images, captions = [jpeg(c) for c in ("red", "green", "blue")], ["a red box", "a green box", "a red box"]
    root = tmp_path / "writers"
    root.mkdir()
    tables = {
        "plain": pa.table({"image": pa.array(images, pa.binary()), "caption": pa.array(captions, pa.string())}),
        "views": pa.table({"image": pa.array(images, pa.binary_view()),
                           "caption": pa.array(captions, pa.string_view())}),
        "categorical": pa.table({"image": pa.array(images, pa.large_binary()),
                                 "caption": pa.array(captions).dictionary_encode()}),
    }
    for name, table in tables.items():
        pq.write_table(table, root / f"{name}.parquet")
    files = list_parquet_files(str(root))
    assert str(pq.read_schema(root / "views.parquet").field("image").type) == "binary_view"
    assert pa.types.is_dictionary(pq.read_schema(root / "categorical.parquet").field("caption").type)
    check_schema(files, ColumnMap())
    tok = train_tokenizer(str(root), 300)
    decoded = {}
    for shard in read_footers(files):
        item = PhaseStream([shard], seed=0, passes=1, group_shards=1, shuffle=False).items()[0]
        (table,) = read_groups(pa.Table.from_pylist([item]), columns=ColumnMap(), chunk_rows=8, seed=0)
        batch = {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}
        decoded[os.path.basename(shard.path)[:-len(".parquet")]] = decode_batch(
            batch, image_size=16, text_length=8, tokenizer_json=tok.to_json(), train=False, seed=0)
    for name in ("views", "categorical"):
        assert decoded[name]["_ok"].tolist() == [1, 1, 1], name
        assert np.array_equal(decoded[name]["image"], decoded["plain"]["image"]), name
        assert np.array_equal(decoded[name]["tokens"], decoded["plain"]["tokens"]), name


def test_null_typed_columns_of_empty_or_all_none_shards_count_as_absent_rows(tmp_path):
    """pandas (and Dask/Spark partitions through it) writes a column with no value, in an empty shard or an
    all-None one, with Arrow's ``null`` type; one such shard stopped the launch ("has type null, expected binary").
    Its rows are absent samples (no image), counted from the footer as the pipeline finds them."""
    from reclip_ray.data.shards import clear_footer_cache, read_footers

    root = tmp_path / "partitions"
    root.mkdir()
    pq.write_table(pa.table({"image": pa.nulls(0), "caption": pa.nulls(0)}), root / "part-0.parquet")
    pq.write_table(pa.table({"image": pa.nulls(3), "caption": ["a", "b", "c"]}), root / "part-1.parquet")
    pq.write_table(pa.table({"image": [b"\xff\xd8 not really"], "caption": pa.nulls(1)}), root / "part-2.parquet")
    files = list_parquet_files(str(root))
    assert str(pq.read_schema(files[1]).field("image").type) == "null"
    check_schema(files, ColumnMap())
    clear_footer_cache()
    assert [(s.rows, s.absent) for s in read_footers(files)] == [(0, 0), (3, 3), (1, 0)]
    report = inspect_dataset(str(root))
    assert (report["rows"], report["rows_absent"], report["rows_bad"]) == (4, 3, 1)
