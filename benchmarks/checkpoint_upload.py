"""What a checkpoint costs the step loop with ``checkpoint.upload: sync`` and ``async``, on a real S3 API.

Why: rank 0 writes each checkpoint to a local temp folder and Ray Train copies it to ``run.storage_path``. With
``sync`` every rank waits for that copy (1.8 GB for vit-b-16, 5.1 GB for vit-l-16, to object storage); with
``async`` Ray Train copies it in a thread while training goes on. The job logs ``checkpoint_s`` to MLflow at each
checkpoint: the seconds rank 0 spent in it, which every other rank waits at its next collective.

The job is the real ``reclip-ray train`` (the tiny preset's data and schedule, 2 CPU workers, or ``--set`` more),
its run folder on S3 served by moto (``moto[server]``, the tests' S3; it runs in this process, on localhost), its
MLflow store a SQLite file. The modes alternate, ``--rounds`` each. Usage (alone on the machine: it starts Ray)::

    python benchmarks/checkpoint_upload.py --data reclip_data --tokenizer reclip_runs/tiny/tokenizer.json \
        --set model=small --set checkpoint.every_samples=2000

Prints one JSON line per job (mode, wall seconds, the checkpoints' ``checkpoint_s``) and a summary line: per mode
the median ``checkpoint_s`` over all its checkpoints and the median job wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "bench-checkpoints"


def start_s3():
    """A moto S3 server on localhost with one bucket; the AWS variables point this process and the job at it.
    Returns (endpoint URL, the server)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    return endpoint, server


def run_job(mode: str, index: int, args: argparse.Namespace, work: Path) -> dict:
    """One ``reclip-ray train`` job; its wall time and the ``checkpoint_s`` points MLflow holds."""
    from mlflow.tracking import MlflowClient

    name = f"upload-{mode}-{index}"
    db = work / f"{name}.db"
    sets = [f"data.train={args.data}/train", f"data.eval={args.data}/eval", "data.synth_if_missing=false",
            *([f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []), f"run.name={name}", f"run.storage_path=s3://{BUCKET}/runs",
            f"tracking.uri=sqlite:///{db}", "tracking.experiment=bench-upload", f"checkpoint.upload={mode}",
            "eval.at_phase_end=false", *args.set]
    command = [sys.executable, "-m", "reclip_ray", "train", "--config", args.config]
    command += [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": args.code})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("bench-upload").experiment_id])
    costs = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "checkpoint_s"))
    return {"bench": "checkpoint_upload", "mode": mode, "round": index, "wall_s": round(wall, 2),
            "status": run.info.status, "checkpoints": len(costs),
            "checkpoint_s": [round(v, 3) for _, v in costs], "steps": [s for s, _ in costs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a dataset folder with train/ and eval/ (the default job's)")
    parser.add_argument("--tokenizer", default="", help="a tokenizer.json (else each job trains one at launch)")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--set", action="append", default=[], help="more overrides for both modes")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="the checkout to run")
    args = parser.parse_args(argv)
    args.data = str(Path(args.data).resolve())
    endpoint, _ = start_s3()
    print(json.dumps({"bench": "checkpoint_upload", "s3": endpoint, "code": args.code, "sets": args.set}), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        for index in range(args.rounds):
            for mode in ("sync", "async"):
                rows.append(run_job(mode, index, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    summary = {"bench": "checkpoint_upload_summary"}
    for mode in ("sync", "async"):
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {"checkpoint_s_median": round(statistics.median(v for r in mine for v in r["checkpoint_s"]), 3),
                         "wall_s_median": round(statistics.median(r["wall_s"] for r in mine), 2),
                         "checkpoints_per_job": [r["checkpoints"] for r in mine]}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
