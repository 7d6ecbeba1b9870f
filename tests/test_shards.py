"""The data floor (``reclip_ray.data.shards``) and ``dataset.json`` beside the shards: what the modules above rely on.

The footer cache itself is tested where its cost matters (``test_driver_startup.py``: each footer read once per
launch, a rewritten shard seen again); these cover what moved with it: ``dataset.json`` read from the folder or a
file inside it, and written in its writer's key order (evaluation lists the label sets in that order).
"""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reclip_ray import storage
from reclip_ray.data.copies import shrink_dataset
from reclip_ray.data.schema import read_dataset_json
from reclip_ray.data.shards import COPIES_KEY, list_parquet_files, read_footers, split_pattern, write_parquet_atomic
from reclip_ray.errors import DataError


def _jpeg(side: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (value, 255 - value, 128)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path) -> str:
    root = tmp_path / "d"
    table = pa.table({"key": [f"k{i}" for i in range(6)], "image": pa.array([_jpeg(96, 40 * i) for i in range(6)]),
                      "caption": [f"a square {i}" for i in range(6)]})
    write_parquet_atomic(table, str(root / "shard-00000.parquet"))
    # label sets deliberately not in alphabetical order: a sorted rewrite would reorder them
    (root / "dataset.json").write_text(json.dumps({"rows": 6, "label_sets": {"shape": {}, "colour": {}}}))
    return str(root)


def test_shrink_keeps_dataset_json_in_its_writers_order(dataset, tmp_path):
    summary = shrink_dataset(dataset, "40", out=str(tmp_path / "out"), workers=1, log=None)
    assert summary["copies_made"] == 6
    written = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert list(written) == ["rows", "label_sets", "copies"]
    assert list(written["label_sets"]) == ["shape", "colour"]
    assert written["copies"]["sizes"] == [40]
    (shard,) = read_footers(list_parquet_files(str(tmp_path / "out")))
    assert shard.copies == (40,) and shard.rows == 6
    assert json.loads(pq.read_metadata(shard.path).metadata[COPIES_KEY])["sizes"] == [40]
    assert json.loads((tmp_path / "d" / "dataset.json").read_text()) == {"rows": 6, "label_sets":
                                                                        {"shape": {}, "colour": {}}}  # source kept


def test_read_dataset_json_from_the_folder_or_a_file_in_it(dataset, tmp_path):
    meta = {"rows": 6, "label_sets": {"shape": {}, "colour": {}}}
    assert read_dataset_json(dataset) == meta
    assert read_dataset_json(list_parquet_files(dataset)[0]) == meta
    assert read_dataset_json(f"file://{dataset}") == meta
    (tmp_path / "bare").mkdir()
    assert read_dataset_json(str(tmp_path / "bare")) == {}
    (tmp_path / "bare" / "dataset.json").write_text('{"rows": 6,')
    with pytest.raises(DataError, match=r"bare/dataset.json: not valid JSON"):
        read_dataset_json(str(tmp_path / "bare"))
    (tmp_path / "bare" / "dataset.json").write_text(json.dumps(meta), encoding="utf-8-sig")  # Notepad's BOM
    assert read_dataset_json(str(tmp_path / "bare")) == meta


def test_write_json_is_whole_and_ordered_as_asked(tmp_path):
    path = str(tmp_path / "x.json")
    storage.write_json(path, {"b": 1, "a": 2})
    assert list(json.loads(storage.read_text(path))) == ["a", "b"]  # run-folder files: sorted, as before
    storage.write_json(path, {"b": 1, "a": 2}, sort_keys=False)
    assert list(json.loads(storage.read_text(path))) == ["b", "a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temp file left beside it


def test_a_missing_or_unreadable_path_or_shard_is_a_one_line_error(tmp_path, monkeypatch):
    """Listing a folder and statting a shard for the footer cache say which path, and whether it is missing or the
    filesystem could not answer (expired credentials, no network)."""
    from reclip_ray.data.shards import clear_footer_cache, footers

    missing, gone = str(tmp_path / "nope"), str(tmp_path / "gone.parquet")
    clear_footer_cache()
    with pytest.raises(DataError) as err:
        list_parquet_files(missing)
    assert str(err.value) == f"no Parquet files under {missing} (path does not exist)"
    with pytest.raises(DataError) as err:
        footers([gone])
    assert str(err.value) == f"{gone}: shard not found"

    class Unreachable:
        def get_file_info(self, path):
            raise OSError("AWS Error ACCESS_DENIED")

    monkeypatch.setattr(storage, "filesystem", lambda path: (Unreachable(), path))
    with pytest.raises(DataError) as err:
        list_parquet_files(missing)
    assert str(err.value) == f"cannot read {missing}: AWS Error ACCESS_DENIED"
    with pytest.raises(DataError) as err:
        footers([gone])
    assert str(err.value) == f"{gone}: cannot read (AWS Error ACCESS_DENIED)"


def test_listing_skips_what_other_writers_leave_below_the_folder(tmp_path):
    """Spark's ``_temporary/`` attempts, a Delta table's ``_delta_log/`` checkpoints and Jupyter's
    ``.ipynb_checkpoints/`` copies hold ``.parquet`` files that are not shards; ``pyarrow.dataset`` skips any path
    component starting with ``_`` or ``.``, and so does the listing (the folder itself may be named so)."""
    table = pa.table({"image": [_jpeg(8, 1)], "caption": ["x"]})
    root = tmp_path / "_export"
    for rel in ("part-00000-abc.snappy.parquet", "year=2024/part-00001.parquet",
                "_temporary/0/task_1/part-00001.parquet", "_delta_log/00000000000000000010.checkpoint.parquet",
                ".ipynb_checkpoints/part-00000-checkpoint.parquet", "_SUCCESS", "part-00002.parquet.crc"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".parquet"):
            pq.write_table(table, root / rel)
        else:
            (root / rel).write_text("")
    assert list_parquet_files(str(root)) == [str(root / "part-00000-abc.snappy.parquet"),
                                             str(root / "year=2024/part-00001.parquet")]


def test_a_listed_uri_keeps_its_host(tmp_path, monkeypatch):
    """``abfs://container@account.dfs.core.windows.net/data`` (and ``hdfs://namenode:8020/...``): the shards'
    URIs keep the part before the path, which pyarrow's inner paths leave out; rebuilt as scheme + inner path they
    named another container or cluster (``abfs://container/data/...``)."""
    import pyarrow.fs as pafs

    local = tmp_path / "account" / "data"
    local.mkdir(parents=True)
    pq.write_table(pa.table({"image": [_jpeg(8, 1)], "caption": ["x"]}), local / "a.parquet")
    uri = "abfs://container@acct.dfs.core.windows.net/data"
    monkeypatch.setattr(storage, "filesystem", lambda path: (pafs.LocalFileSystem(), str(local)))
    assert list_parquet_files(uri) == [f"{uri}/a.parquet"]


def test_a_pattern_matches_one_folder_level_each_and_a_path_that_exists_is_never_a_pattern(tmp_path):
    """``*`` within a level (``**`` is refused, not read as one level); a folder literally named ``run[1]`` is
    listed as itself; a pattern walks only the folders its levels match."""
    table = pa.table({"image": [_jpeg(8, 1)], "caption": ["x"]})
    for rel in ("a/part-0.parquet", "a/deep/part-1.parquet", "b/part-2.parquet", "c/other.parquet",
                "run[1]/part-3.parquet", "_skip/part-4.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / rel)
    assert list_parquet_files(f"{tmp_path}/*/part-*.parquet") == [  # not a/deep (a level down), not _skip
        str(tmp_path / "a/part-0.parquet"), str(tmp_path / "b/part-2.parquet"), str(tmp_path / "run[1]/part-3.parquet")]
    assert list_parquet_files(f"{tmp_path}/run[1]") == [str(tmp_path / "run[1]/part-3.parquet")]
    assert list_parquet_files(f"{tmp_path}/a/*/*.parquet") == [str(tmp_path / "a/deep/part-1.parquet")]
    with pytest.raises(DataError, match=r"'\*\*' is not a pattern here"):
        list_parquet_files(f"{tmp_path}/**/*.parquet")
    relative = os.path.relpath(tmp_path / "b" / "part-2.parquet")
    assert list_parquet_files(relative) == [os.path.abspath(relative)]  # a file comes back absolute, as a folder's


def test_a_dataset_uri_with_its_stores_options_lists_its_shards_with_them(s3_server, s3_prefix, monkeypatch):
    """``s3://b/data/*/part-*.parquet?endpoint_override=...`` (a MinIO named only in the URI): the pattern is the
    path's, and every shard listed keeps the options (a Ray Data task opens it as it is, on any node).
    ``split_pattern`` cut the query at its first '/' into the pattern, and the splits of a Hugging Face export side
    by side were told apart by the text after the query's last '/', so never refused."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage._remote_filesystem.cache_clear()
    try:
        options = f"endpoint_override={s3_server.split('://')[1]}&scheme=http"
        buffer = io.BytesIO()
        pq.write_table(pa.table({"image": [_jpeg(8, 1)], "caption": ["x"]}), buffer)
        for rel in ("data/a/part-0.parquet", "data/b/part-1.parquet", "data/b/other.parquet",
                    "hf/train-00000-of-00001.parquet", "hf/test-00000-of-00001.parquet"):
            storage.write_bytes(f"{s3_prefix}/{rel}?{options}", buffer.getvalue())
        pattern = f"{s3_prefix}/data/*/part-*.parquet?{options}"
        assert split_pattern(pattern) == (f"{s3_prefix}/data?{options}", "*/part-*.parquet")
        assert list_parquet_files(pattern) == [f"{s3_prefix}/data/{rel}?{options}"
                                               for rel in ("a/part-0.parquet", "b/part-1.parquet")]
        assert list_parquet_files(f"{s3_prefix}/data?{options}") == [
            f"{s3_prefix}/data/{rel}?{options}" for rel in ("a/part-0.parquet", "b/other.parquet", "b/part-1.parquet")]
        with pytest.raises(DataError) as refused:
            list_parquet_files(f"{s3_prefix}/hf?{options}")
        assert str(refused.value).startswith(f"{s3_prefix}/hf?{options} holds the splits train, test")
        assert f"e.g. {s3_prefix}/hf/train-*.parquet?{options} " in str(refused.value)
    finally:
        storage._remote_filesystem.cache_clear()
