"""Training on data our generator did not make (Ray integration, the shared test cluster).

A labelled split (a ``label`` column, as `data ingest` writes from a CSV with labels) once crashed the workers with
``KeyError: 'label'``; img2dataset's shards keep failed downloads as rows with a null ``jpg``; hand-made exports
have no ``key`` column, null cells, PNG/WebP of odd sizes and columns of any type. Each must train, with the rows
that are not samples counted apart from the bad ones.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import mlflow_run
from reclip_ray.data.copies import shrink_shard
from layouts import write_broken_eval_set, write_img2dataset, write_labelled_folder_dataset, write_messy

pytestmark = pytest.mark.slow


def _metrics(db, run_id):
    client, run = mlflow_run(db, run_id)
    assert run.info.status == "FINISHED"
    return run.data.metrics


def test_labelled_messy_and_img2dataset_layouts_train_through_a_failing_evaluation(ray_session, make_cfg, tmp_path,
                                                                                     synth_dir):
    from reclip_ray.train.launch import run_training

    # 1. A labelled split plus a messy export in one folder: label column, no key column in some shards, nulls.
    # Its eval set is broken, so both phase-end evaluations fail: the run still finishes, with the errors in MLflow
    # (one run for both checks: each costs a worker group's ~25 s start-up).
    mixed = tmp_path / "mixed"
    labelled = write_labelled_folder_dataset(mixed / "labelled", n_rows=40, shard_rows=16)
    messy = write_messy(mixed / "messy", n_rows=16)
    broken = write_broken_eval_set(tmp_path / "broken_eval", synth_dir / "eval")
    cfg = make_cfg("labelled", extra=["train.samples=128", "train.batch_size=32", "checkpoint.every_samples=0",
                                      "data.max_bad_fraction=0.5", f"data.eval={broken}"], train=mixed)
    out = run_training(cfg)
    assert out["samples"] == 128
    client, run = mlflow_run(tmp_path / "mlflow.db", out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    errors = {k: v for k, v in run.data.tags.items() if k.startswith("reclip.eval_error.")}
    assert set(errors) == {"reclip.eval_error.lowres", "reclip.eval_error.finetune"}, errors
    assert all("no readable rows" in v for v in errors.values()), errors
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval_errors")] == [1.0, 1.0]
    assert not any(k.startswith("eval/") for k in run.data.metrics)
    m = run.data.metrics
    # Every bad row of the messy export is a real one (null / empty caption), never an absent row; the null image
    # is absent. Passes repeat rows, so compare rates, not counts.
    assert m["data_rows_seen"] >= 128 and m["data_rows_bad"] > 0
    assert m["data_rows_bad"] / m["data_rows_seen"] < 2 * len(messy.bad_keys) / (len(labelled.valid_keys) + 13)
    assert m["data_rows_absent"] >= 1

    # 2. img2dataset's parquet output as it is: jpg + caption, 40 % failed downloads, a few corrupt images; two of
    # its three shards carry shrunk copies (`data shrink`), the third does not (it falls back to `jpg`, counted).
    shards = write_img2dataset(tmp_path / "img2dataset", n_rows=160, failed_fraction=0.4, shards=3, corrupt=2)
    for f in shards.files[:2]:
        shrink_shard(f, [40, 80], image_column="jpg")
    cfg = make_cfg("img2dataset", extra=["train.samples=128", "train.batch_size=32", "checkpoint.every_samples=0",
                                         "eval.at_phase_end=false", "data.image_column=jpg", "data.max_bad_fraction=0.05",
                                         f"data.caption_column={shards.caption_column}"], train=shards.path)
    out = run_training(cfg)
    assert out["samples"] == 128
    m = _metrics(tmp_path / "mlflow.db", out["mlflow_run_id"])
    present = len(shards.valid_keys) + len(shards.bad_keys)
    # 40 % of the rows are failed downloads: far past data.max_bad_fraction (1 %) if they counted as bad.
    assert m["data_rows_absent"] >= len(shards.absent_keys) * (m["data_rows_seen"] // present)
    assert 0 < m["data_rows_bad"] / m["data_rows_seen"] <= 2 * len(shards.bad_keys) / present + 0.01
    rows = pq.read_table(shards.files[0])
    assert rows.column("jpg").null_count > 0 and pa.types.is_binary(rows.schema.field("jpg").type)
    _, run = mlflow_run(tmp_path / "mlflow.db", out["mlflow_run_id"])
    without = "(full image: 1 without a copy that covers it)"
    assert run.data.tags["reclip.data_source.lowres"] == f"jpg in 1 shard, jpg_40 in 2 shards {without}"
    assert run.data.tags["reclip.data_source.finetune"] == f"jpg in 1 shard, jpg_80 in 2 shards {without}"
