"""Ray Data pipeline: one set of shards, two phase resolutions, bad rows counted by the counter actor."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reclip_ray.data.images import decode_image
from reclip_ray.data.pipeline import check_counter, get_or_create_bad_counter, phase_dataset, read_shards
from reclip_ray.data.schema import ColumnMap, list_parquet_files
from reclip_ray.errors import DataError

pytestmark = pytest.mark.slow


def test_two_resolutions_from_the_same_shards(ray_session, synth_dir, tokenizer_path):
    tok_json = tokenizer_path.read_text()
    ds = read_shards(str(synth_dir / "eval"), ColumnMap(), shuffle_files=False)
    first = pq.read_table(list_parquet_files(str(synth_dir / "eval"))[0]).slice(0, 1).to_pylist()[0]
    for size, length in ((32, 8), (96, 20)):
        phase = phase_dataset(ds, image_size=size, text_length=length, tokenizer_json=tok_json, train=False,
                              seed=0, batch_size=50)
        batches = list(phase.iter_torch_batches(batch_size=64))
        assert sum(len(b["image"]) for b in batches) == 200
        b = batches[0]
        assert b["image"].shape == (64, size, size, 3) and b["image"].dtype == torch.uint8
        assert b["tokens"].shape == (64, length) and b["tokens"].dtype == torch.int64
        assert b["label"].dtype == torch.int64 and "label_pattern" in b
        # eval decode is deterministic: the first row equals a direct decode_image call
        assert np.array_equal(b["image"][0].numpy(), decode_image(first["image"], size, train=False))
        assert int(b["label"][0]) == first["label"]


def test_bad_rows_dropped_and_counted_with_renamed_columns(ray_session, synth_dir, tokenizer_path, tmp_path):
    rows = pq.read_table(list_parquet_files(str(synth_dir / "train"))[0]).slice(0, 40).to_pylist()
    rows[3]["image"] = rows[3]["image"][:200]  # truncated JPEG
    rows[10]["image"] = b"not an image"
    rows[20]["caption"] = ""
    renamed = [{"key": r["key"], "jpg": r["image"], "txt": r["caption"]} for r in rows]  # img2dataset-like names
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "d" / "part-00000.parquet")

    with pytest.raises(DataError, match="missing image column 'image'"):
        read_shards(str(tmp_path / "d"), ColumnMap())
    counter = get_or_create_bad_counter("test_bad_rows")
    ds = read_shards(str(tmp_path / "d"), ColumnMap(image="jpg", caption="txt"), seed=1)
    phase = phase_dataset(ds, image_size=48, text_length=12, tokenizer_json=str(tokenizer_path), train=True,
                          seed=0, batch_size=16, bad_counter=counter)
    n = sum(len(b["tokens"]) for b in phase.iter_torch_batches(batch_size=16))
    assert n == 37
    import ray

    totals = ray.get(counter.totals.remote())
    assert totals["seen"] == 40 and totals["bad"] == 3
    reasons = sorted(e["reason"].split(":")[0] for e in totals["examples"])
    assert reasons == ["cannot identify image", "empty caption", "truncated image"]
    assert {e["file"] for e in totals["examples"]} == {"part-00000.parquet"}
    assert {e["key"] for e in totals["examples"]} == {rows[i]["key"] for i in (3, 10, 20)}
    assert get_or_create_bad_counter("test_bad_rows")._ray_actor_id == counter._ray_actor_id
    assert check_counter(counter, 0.1)["bad"] == 3
    with pytest.raises(DataError, match=r"3 of 40 rows \(7.5%\) bad rows \(> 1.0%.*part-00000\.parquet key="):
        check_counter(counter, 0.01)


def test_decode_concurrency_comes_from_the_config_or_the_cluster(ray_session):
    from reclip_ray.config import load_config
    from reclip_ray.train.launch import decode_concurrency

    assert decode_concurrency(load_config("tiny", ["data.read_parallelism=3"])) == 3
    cpus = int(ray_session.cluster_resources()["CPU"])  # the test cluster's head has 4 logical CPUs
    assert decode_concurrency(load_config("tiny")) == max(4, cpus) >= 4
