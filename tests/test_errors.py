"""The one line a user sees when training fails inside Ray: the real cause, not Ray's wrapping or advice."""

from __future__ import annotations

from reclip_ray.errors import DataError
from reclip_ray.train.ray_errors import root_message


def test_worker_data_error_is_found_inside_ray_train_wrapping():
    from ray.train.v2.api.exceptions import WorkerGroupError

    inner = DataError("shard /d/shard-00001.parquet disappeared during the run (data.missing_shards=fail; ...)")
    wrapped = RuntimeError("RayTaskError(DataError): Traceback ...\n\nTo change retry attempts, configure DataContext")
    wrapped.__cause__ = inner
    # Ray Train's own message holds only a truncated snippet ending in Ray Data's advice.
    err = WorkerGroupError("[Rank 0 Error Snippet]:\n...\nTo change retry attempts, configure DataContext",
                           {0: wrapped})
    assert root_message(err) == "shard /d/shard-00001.parquet disappeared during the run (data.missing_shards=fail; ...)"


def test_foreign_errors_keep_their_type_and_plain_text_falls_back_to_the_last_line():
    assert root_message(RuntimeError("Traceback:\n  File x\nValueError: bad value\nsome advice")) == "ValueError: bad value"
    assert root_message(RuntimeError("first line\nlast line")) == "last line"
    assert root_message(RuntimeError("")) == "RuntimeError"
