"""How often two launches made at the same instant both take one run folder's lease (``reclip_ray.lease``).

Why: the lease is a read then a write (pyarrow has no conditional PUT), so two drivers that read the folder free
at the same moment both wrote and both trained it. The launch now reads its lease back after ``lease.SETTLE_S``.
Each trial starts two processes that import the tree's ``reclip_ray.lease``, waits until both are ready, and has
them call ``Lease.take()`` at one wall-clock instant; each prints whether it took the folder or was refused. A
folder on S3 goes to a moto server this script starts (the test suite's S3 API).

Usage (compare trees by PYTHONPATH)::

    python benchmarks/lease_race.py --where local --trials 20
    PYTHONPATH=/tmp/old python benchmarks/lease_race.py --where s3 --trials 20

Prints one JSON line: trials, how many left both holding the folder, how many exactly one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time
from reclip_ray import lease
from reclip_ray.errors import ReclipError
mine = lease.Lease(sys.argv[1])
print(lease.__file__, flush=True)
time.sleep(max(0.0, float(sys.stdin.readline()) - time.time()))
try:
    mine.take()
except ReclipError:
    print("refused", flush=True)
else:
    print("took", flush=True)
    time.sleep(2.0)  # still holding it when the other reads its own back
    mine.release()
"""


def _s3_env() -> dict[str, str]:
    """A moto S3 server with one bucket, ``race``; the AWS variables that reach it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="race")
    return env


def trial(folder: str, env: dict[str, str]) -> tuple[list[str], str]:
    """What each of two launches taking ``folder`` at one instant said ("took" or "refused"), and the lease module
    they ran. They run in an empty folder: ``python -c`` puts its working directory first on ``sys.path``, which
    would pick the checkout there over PYTHONPATH's."""
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, folder], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=tempfile.mkdtemp()) for _ in range(2)]
    modules = {p.stdout.readline().strip() for p in procs}
    if len(modules) != 1 or not next(iter(modules)).endswith("lease.py"):
        raise SystemExit(f"a child did not start: {modules}")
    at = f"{time.time() + 0.2}\n"
    for p in procs:
        p.stdin.write(at)
        p.stdin.flush()
    return sorted(p.communicate(timeout=120)[0].strip() for p in procs), modules.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--where", choices=["local", "s3"], default="local")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    env = {**os.environ, **(_s3_env() if args.where == "s3" else {})}
    outcomes = []
    for i in range(args.trials):
        folder = f"s3://race/run{i}" if args.where == "s3" else os.path.join(tempfile.mkdtemp(), "run")
        said, module = trial(folder, env)
        outcomes.append(said)
    print(json.dumps({"lease_module": module, "where": args.where, "trials": args.trials,
                      "both_took": sum(o == ["took", "took"] for o in outcomes),
                      "exactly_one": sum(o == ["refused", "took"] for o in outcomes)}))


if __name__ == "__main__":
    main()
