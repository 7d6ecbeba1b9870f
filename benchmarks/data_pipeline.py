"""Decode + resize throughput (JSON lines); same as ``reclip-ray bench data``. Results go to BENCHMARKS.md."""

import sys

from reclip_ray.bench.data import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
