"""How long a restart waits for the checkpoint it resumes from: ``pyarrow.fs.copy_files`` (what Ray's
``Checkpoint.as_directory`` uses) against ``storage.copy_to_local``, with pyarrow's real S3 client.

Why: every restart from object storage copies the checkpoint to each node before any rank trains (1.8 GB for
vit-b-16, 5.1 GB for vit-l-16). ``copy_files`` reads a file as 1 MB ranged GETs, each waiting for the one before;
``copy_to_local`` keeps 16 GETs of 16 MB in flight.

The server: moto on localhost (``moto[server]``, the tests' S3) answers every request but the ranged GETs of the
checkpoint's ``state.pt``. Those it cannot answer at S3's cost: moto reads the whole object for each ranged GET
(141.8 ms for 1 MB of a 256 MB object, 4.0 ms of a 2 MB one, measured here), so a copy in many small GETs would
look many times slower than it is. This script answers them itself from the source file, as an object store would
at a cost modelled by two numbers: ``--latency-ms`` to the first byte and ``--stream-mbps`` per connection. So the
request pattern, the GETs pyarrow really keeps in flight and the bytes are measured; the seconds follow from the
model. Usage (no Ray)::

    python benchmarks/restore_download.py --mb 1024 --latency-ms 20 50 --stream-mbps 100 --rounds 3

Prints one JSON line per copy (method, seconds, ranged GETs, most GETs in flight) and one summary line per latency:
each method's median seconds and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_upload import BUCKET, start_s3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="the checkpoint's state.pt, in MB")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[20.0, 50.0])
    parser.add_argument("--stream-mbps", type=float, default=100.0, help="MB/s one connection transfers")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    _, server = start_s3()
    import pyarrow.fs as pafs

    from reclip_ray import storage

    latency = [0.0]
    gets = {"count": 0, "in_flight": 0, "most": 0}
    lock = threading.Lock()
    app = server._server.app

    work = Path(tempfile.mkdtemp(prefix="restore-bench-"))
    src = work / "ckpt"
    src.mkdir()
    (src / "state.pt").write_bytes(os.urandom(args.mb << 20))
    (src / "meta.json").write_text("{}")
    size = args.mb << 20
    source_fd = os.open(src / "state.pt", os.O_RDONLY)

    def object_store(environ, start_response):
        ranged = re.fullmatch(r"bytes=(\d+)-(\d+)", environ.get("HTTP_RANGE", ""))
        if environ["REQUEST_METHOD"] != "GET" or ranged is None or not environ["PATH_INFO"].endswith("/state.pt"):
            return app(environ, start_response)
        first, last = int(ranged[1]), min(int(ranged[2]), size - 1)
        with lock:
            gets["count"] += 1
            gets["in_flight"] += 1
            gets["most"] = max(gets["most"], gets["in_flight"])
        try:
            time.sleep(latency[0])
            body = os.pread(source_fd, last - first + 1, first)
            time.sleep(len(body) / (args.stream_mbps * 1e6))
        finally:
            with lock:
                gets["in_flight"] -= 1
        start_response("206 Partial Content", [("Content-Type", "application/octet-stream"),
                                               ("Content-Length", str(len(body))),
                                               ("Content-Range", f"bytes {first}-{last}/{size}")])
        return [body]

    server._server.app = object_store

    uri = f"s3://{BUCKET}/ckpt"
    storage.upload_dir(str(src), uri)
    fs, inner = storage.filesystem(uri)
    methods = {
        "copy_files": lambda out: pafs.copy_files(inner, out, source_filesystem=fs,
                                                  destination_filesystem=pafs.LocalFileSystem()),
        "copy_to_local": lambda out: storage.copy_to_local(fs, inner, out),
    }
    try:
        for ms in args.latency_ms:
            latency[0] = ms / 1000
            times: dict[str, list[float]] = {name: [] for name in methods}
            for r in range(args.rounds):
                order = list(methods) if r % 2 == 0 else list(reversed(methods))
                for name in order:
                    out = str(work / f"out-{name}")
                    shutil.rmtree(out, ignore_errors=True)
                    os.makedirs(out)  # copy_files needs it (Ray makes it before its copy)
                    gets.update(count=0, most=0)
                    t0 = time.perf_counter()
                    methods[name](out)
                    seconds = time.perf_counter() - t0
                    assert os.path.getsize(os.path.join(out, "state.pt")) == args.mb << 20
                    times[name].append(seconds)
                    with open(os.path.join(out, "state.pt"), "rb") as f:
                        assert f.read(1 << 20) == os.pread(source_fd, 1 << 20, 0)
                    print(json.dumps({"method": name, "latency_ms": ms, "stream_mbps": args.stream_mbps,
                                      "mb": args.mb, "seconds": round(seconds, 3), "ranged_gets": gets["count"],
                                      "most_in_flight": gets["most"]}), flush=True)
            med = {name: statistics.median(v) for name, v in times.items()}
            print(json.dumps({"summary": True, "latency_ms": ms, "stream_mbps": args.stream_mbps, "mb": args.mb,
                              **{f"median_s_{k}": round(v, 3) for k, v in med.items()},
                              "speedup": round(med["copy_files"] / med["copy_to_local"], 2)}), flush=True)
    finally:
        os.close(source_fd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
