"""A read task's memory is bounded by pages, not shards (README "Data": what a read task holds).

Measured as the peak of Arrow's memory pool in a fresh process (all Parquet buffers come from it), while one read
task's generator (``pipeline.read_groups``) streams a group of shards that were each written as one big row group,
as img2dataset writes them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARDS, IMAGE_BYTES = 4, 20_000  # a group of 4 shards of 20 KB "images"


def _peak_mib(folder: str, rows: int) -> float:
    code = textwrap.dedent(f"""
        import json, pyarrow as pa
        from reclip_ray.data.pipeline import read_groups
        from reclip_ray.data.schema import ColumnMap
        from reclip_ray.data.shards import list_parquet_files, read_footers
        from reclip_ray.data.stream import PhaseStream
        shards = read_footers(list_parquet_files({folder!r}))
        item = PhaseStream(shards, seed=0, passes=1, group_shards={SHARDS}, chunk_rows=64).items()[0]
        rows = sum(t.num_rows for t in read_groups(pa.Table.from_pylist([item]), columns=ColumnMap(), chunk_rows=64,
                                                   seed=0))
        print(json.dumps({{"rows": rows, "peak": pa.default_memory_pool().max_memory()}}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    timeout=120).stdout.strip().splitlines()[-1])
    assert out["rows"] == SHARDS * rows
    return out["peak"] / 2**20


def _write(folder, rows: int) -> None:
    """Shards of one row group each (as img2dataset writes them), with 64-row pages (as our writers write them)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for s in range(SHARDS):
        table = pa.table({"key": [f"{s}-{i}" for i in range(rows)],
                          "image": pa.array([rng.bytes(IMAGE_BYTES) for _ in range(rows)], pa.binary()),
                          "caption": ["a caption"] * rows})
        pq.write_table(table, folder / f"{s}.parquet", row_group_size=rows, compression="none", write_batch_size=64)


def test_a_read_task_holds_pages_not_shards(tmp_path):
    """The peak does not grow with the shard size: 5x longer shards (8 -> 40 MB each) leave it where it was, far
    below the group's 153 MB that a whole-column-chunk read would hold."""
    _write(tmp_path / "short", 400)
    _write(tmp_path / "long", 2000)
    short, long = _peak_mib(str(tmp_path / "short"), 400), _peak_mib(str(tmp_path / "long"), 2000)
    group_mib = SHARDS * 2000 * IMAGE_BYTES / 2**20
    assert long < 1.25 * short, (short, long)
    assert long < 0.3 * group_mib, (long, group_mib)
