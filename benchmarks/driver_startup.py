"""Driver start-up at many shards: what ``reclip-ray train`` does on the driver before Ray Train starts workers.

Why: on a DataComp-size bucket (~140k shards) every serial pass over the Parquet footers, and a tokenizer trained
over every caption, is minutes of a 64-GPU reservation spent idle before the first step. This times the part of
start-up that grows with the file count, without starting Ray (another Ray on the machine would interfere):

* ``prepare``: schema check of the train shards, the eval-set checks, the BPE tokenizer (``data.tokenizer`` empty,
  so it is trained at launch as the default job does);
* ``build_datasets``: the footers for the phase streams and the per-phase dataset factories (with
  ``data.read_parallelism`` set, so it needs no Ray cluster to size itself);
* ``pickle``: serialising those factories, which is what Ray ships to the Train controller.

Not timed (independent of the shard count): starting Ray, the MLflow run, the worker group, the first batch.

Usage (run each variant in its own process; the dataset is made once and reused)::

    python benchmarks/driver_startup.py --data /tmp/drv20k                      # this tree
    PYTHONPATH=/tmp/old python benchmarks/driver_startup.py --data /tmp/drv20k  # another checkout

Prints one JSON line: the seconds of each piece, the total, and which ``reclip_ray`` was measured.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

WORDS = ("red green blue yellow purple orange black white small large tiny huge circle square triangle star "
         "striped dotted plain shiny on a the with of in near top left right bottom photo picture drawing").split()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 60)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(root: Path, shards: int, rows: int, seed: int = 0) -> None:
    """``shards`` tiny Parquet files of ``rows`` rows under root/train (20 sub-folders), and a small eval set.

    Every row reuses one real JPEG; captions are random word strings, so the tokenizer has something to learn.
    Written once; a ``.done`` marker makes a rerun reuse it.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (root / ".done").is_file():
        return
    rng = np.random.default_rng(seed)
    image = _jpeg()
    for split, n_files, n_rows in (("train", shards, rows), ("eval", 2, 50)):
        for i in range(n_files):
            folder = root / split / f"part{i % 20:02d}" if split == "train" else root / split
            folder.mkdir(parents=True, exist_ok=True)
            caps = [" ".join(rng.choice(WORDS, size=8)) for _ in range(n_rows)]
            table = pa.table({
                "key": [f"{split}{i:06d}_{r}" for r in range(n_rows)],
                "image": pa.array([image] * n_rows, type=pa.binary()),
                "caption": caps,
            })
            pq.write_table(table, folder / f"{i:06d}.parquet")
    (root / ".done").write_text(json.dumps({"shards": shards, "rows": rows}))


def measure(root: Path, work: Path, overrides: list[str] | None = None) -> dict:
    """Seconds of each driver-side piece, in one process, in the order ``run_training`` runs them."""
    import reclip_ray
    from reclip_ray.evaluation import eval_set
    from reclip_ray.config import load_config
    from reclip_ray.data import schema
    from reclip_ray.train import datasets as train_datasets, prepare as train_prepare

    t_import = time.perf_counter() - T_START
    pieces: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                pieces[name] = pieces.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    # Every Parquet footer parse goes through pyarrow.parquet.ParquetFile (read_schema and read_metadata too);
    # counting its constructions counts footer reads, data reads (the tokenizer's caption column) included.
    import pyarrow.parquet as pq

    opens = [0]
    real_init = pq.ParquetFile.__init__

    def counting_init(self, *a, **k):
        opens[0] += 1
        real_init(self, *a, **k)

    pq.ParquetFile.__init__ = counting_init
    # prepare() imports these by name at call time, so patching the modules' attributes times its pieces.
    schema.check_schema = timed("check_schema_train", schema.check_schema)
    eval_set.check_eval_set = timed("check_eval_set", eval_set.check_eval_set)
    train_prepare.ensure_tokenizer = timed("tokenizer", train_prepare.ensure_tokenizer)

    cfg = load_config("tiny", [
        f"data.train={root / 'train'}", f"data.eval={root / 'eval'}", "data.tokenizer=", "data.synth_if_missing=false",
        "data.read_parallelism=4", f"run.storage_path={work / 'runs'}", "run.name=bench-driver",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "scaling.min_workers=1", "scaling.max_workers=1",
        *(overrides or []),
    ])
    t0 = time.perf_counter()
    prep = train_prepare.prepare(cfg)
    t_prepare = time.perf_counter() - t0
    tokenizer_json = Path(prep.tokenizer_path).read_text()
    t0 = time.perf_counter()
    datasets = train_datasets.build_datasets(prep.cfg, tokenizer_json, prep.run_dir)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    blob = pickle.dumps(datasets)
    t_pickle = time.perf_counter() - t0
    return {
        "reclip_ray": os.path.dirname(reclip_ray.__file__),
        "shards": sum(1 for _ in (root / "train").rglob("*.parquet")),
        "import_s": round(t_import, 2),
        **{f"{k}_s": round(v, 2) for k, v in pieces.items()},
        "prepare_s": round(t_prepare, 2),
        "build_datasets_s": round(t_build, 2),
        "pickle_s": round(t_pickle, 2),
        "pickle_mb": round(len(blob) / 1e6, 1),
        "parquet_opens": opens[0],
        "total_s": round(time.perf_counter() - T_START, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "reclip-driver-bench"),
                   help="dataset folder (made on first use, then reused)")
    p.add_argument("--shards", type=int, default=20000)
    p.add_argument("--rows", type=int, default=4, help="rows per shard")
    p.add_argument("--make-only", action="store_true", help="write the dataset and exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args(argv)
    root = Path(args.data)
    t0 = time.perf_counter()
    make_dataset(root, args.shards, args.rows)
    if args.make_only:
        print(json.dumps({"made": str(root), "seconds": round(time.perf_counter() - t0, 1)}))
        return 0
    with tempfile.TemporaryDirectory(prefix="reclip-driver-") as work:
        print(json.dumps({**measure(root, Path(work), args.set), "set": args.set}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
