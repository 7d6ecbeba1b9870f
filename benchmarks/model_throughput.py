"""Train-step throughput vs. resolution + FLOPs table (JSON lines); same as ``reclip-ray bench model``."""

import sys

from reclip_ray.bench.model import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
