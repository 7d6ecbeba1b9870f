"""Peak memory of one large write to S3: ``storage.upload_dir`` (a model export), ``storage.write_bytes`` (a Parquet
shard held as bytes) and ``pyarrow.fs.copy_files`` (what ``upload_dir`` used before), against the object's size; and
of a checkpoint's upload: Ray Train 2.60's own copy (``StorageContext.persist_current_checkpoint``: ``copy_files``
with 64 MB chunks) and the worker's ``checkpoint_upload_fn`` (``train/persist.py``: ``upload_dir``).

Why: the process that writes a model export is rank 0 or the driver (vit-b-16's weights are ~600 MB, vit-l-16's
1.7 GB). pyarrow's S3 output stream, with background writes, copies each 10 MB part of a write into a buffer of its
own and queues the upload on its I/O threads; nothing bounds that queue, so one ``write`` of a whole buffer could
hold a second copy of it until the parts are sent.

Each case runs in a fresh Python process (``tests/child.py``): its growth of VmHWM (peak resident memory, from
/proc) over the operation; the growth of its anonymous resident memory (RssAnon, sampled every 5 ms: VmHWM also
counts the pages of a memory-mapped file, which the kernel can drop and read again); and the peak of Arrow's memory
pool (where pyarrow's part copies come from). For ``write_bytes`` the bytes are read before the baseline; and before
it, in every case, one 10 MB multipart write (``storage.write_bytes``) builds what a process builds once: boto3 and
its client (``storage`` lists and aborts uploads with it: ~50 MB), pyarrow's S3 clients and I/O threads. So the
growth is what the write adds. The server: moto on
localhost (``moto[server]``, the tests' S3), in this process; each object is deleted after it is checked. Usage
(no Ray)::

    python benchmarks/s3_write_memory.py --mb 400 --runs 3
    python benchmarks/s3_write_memory.py --mb 300 --runs 3 --checkpoint --cases ray_copy checkpoint_upload_fn

``--checkpoint``: the folder is a checkpoint's (``state.pt`` of that size, ``meta.json``, ``config.yaml``). Ray's
modules and its ``StorageContext`` (which writes a marker object) are made before the baseline; no Ray is started.

Prints one JSON line per case and run (MB written, VmHWM growth, Arrow pool peak, seconds) and one summary line:
per case the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_upload import BUCKET, start_s3  # noqa: E402
from child import run_python  # noqa: E402

# The operation, timed between two readings of VmHWM; ``path`` is the local file, ``uri`` the object's folder
# (``uri/checkpoint`` for the checkpoint cases); ``SETUP``'s code for a case runs before the baseline.
RAY_STORAGE = ("import ray.train\n"
               "from ray.train.v2._internal.execution.storage import StorageContext\n"
               "from reclip_ray import storage\n"
               "ctx = StorageContext(storage.pyarrow_uri(storage.parent(uri)), storage.name(uri))\n")
SETUP = {"ray_copy": RAY_STORAGE,
         "checkpoint_upload_fn": RAY_STORAGE + "from reclip_ray.train.persist import checkpoint_uploader\n"
                                               "upload = checkpoint_uploader(uri, ctx)\n"}
CASES = {
    "upload_dir": "from reclip_ray import storage\n"
                  "storage.upload_dir(os.path.dirname(path), uri)\n",
    "write_bytes": "from reclip_ray import storage\n"
                   "storage.write_bytes(uri + '/' + os.path.basename(path), data)\n",
    "copy_files": "import pyarrow.fs as pafs\n"
                  "from reclip_ray import storage\n"
                  "fs, inner = storage.filesystem(uri)\n"
                  "pafs.copy_files(os.path.dirname(path), inner, source_filesystem=pafs.LocalFileSystem(),\n"
                  "                destination_filesystem=fs)\n",
    "ray_copy": "ctx.persist_current_checkpoint(ray.train.Checkpoint.from_directory(os.path.dirname(path)), "
                "'checkpoint')\n",
    "checkpoint_upload_fn": "upload(ray.train.Checkpoint.from_directory(os.path.dirname(path)), 'checkpoint')\n",
}

CHILD = ("import json, os, sys, threading, time\n"
         "import boto3, pyarrow as pa\n"
         "import reclip_ray.storage\n"
         "def rss_anon():\n"
         "    return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024\n"
         "anon, done = [0], threading.Event()\n"
         "def sample():\n"
         "    while not done.wait(0.005):\n"
         "        anon[0] = max(anon[0], rss_anon())\n"
         "path, uri, case = sys.argv[1], sys.argv[2], sys.argv[3]\n"
         "data = open(path, 'rb').read() if case == 'write_bytes' else None\n"
         "code = sys.argv[4]\n"
         "exec(sys.argv[5])\n"
         "reclip_ray.storage.write_bytes(uri + '/warm-up', bytes(reclip_ray.storage.SINGLE_PUT_BYTES))\n"
         "threading.Thread(target=sample, daemon=True).start()\n"
         "before, anon_before, t0 = hwm(), rss_anon(), time.perf_counter()\n"
         "exec(code)\n"
         "seconds = time.perf_counter() - t0\n"
         "done.set()\n"
         "print(json.dumps({'hwm_growth': hwm() - before, 'anon_growth': max(anon[0], rss_anon()) - anon_before,\n"
         "                  'pool_peak': pa.default_memory_pool().max_memory(), 'seconds': seconds}))\n")


def run_case(case: str, path: str, prefix: str) -> dict:
    done = run_python(CHILD, path, prefix, case, CASES[case], SETUP.get(case, ""), timeout=600, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=400, help="size of the file written, in MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--checkpoint", action="store_true", help="a checkpoint's folder: state.pt, meta.json, config.yaml")
    args = ap.parse_args()

    import boto3

    endpoint, server = start_s3()
    s3 = boto3.client("s3", endpoint_url=endpoint)
    size = args.mb << 20
    results: dict[str, list[dict]] = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "export"))
        path = os.path.join(tmp, "export", "state.pt" if args.checkpoint else "weights.bin")
        if args.checkpoint:
            Path(tmp, "export", "meta.json").write_text('{"samples": 256}\n')
            Path(tmp, "export", "config.yaml").write_text("name: tiny\n")
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        for run in range(args.runs):
            for case in args.cases:
                prefix = f"mem-{case}-{run}"
                out = run_case(case, path, f"s3://{BUCKET}/{prefix}")
                folder = f"{prefix}/checkpoint" if case in SETUP else prefix
                key = f"{folder}/{os.path.basename(path)}"
                stored = s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
                if stored != size:
                    raise SystemExit(f"{case}: {stored} bytes stored, {size} written")
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
                    for obj in page.get("Contents", []):
                        s3.delete_object(Bucket=BUCKET, Key=obj["Key"])
                row = {"case": case, "run": run, "mb": args.mb, "hwm_growth_mb": round(out["hwm_growth"] / 2**20, 1),
                       "anon_growth_mb": round(out["anon_growth"] / 2**20, 1),
                       "pool_peak_mb": round(out["pool_peak"] / 2**20, 1), "seconds": round(out["seconds"], 2)}
                results[case].append(row)
                print(json.dumps(row), flush=True)
    server.stop()
    keys = ("hwm_growth_mb", "anon_growth_mb", "pool_peak_mb", "seconds")
    summary = {case: {k: statistics.median(r[k] for r in rows) for k in keys} for case, rows in results.items()}
    print(json.dumps({"summary": summary, "mb": args.mb, "runs": args.runs}))


if __name__ == "__main__":
    main()
