"""`ray job submit ... -- python jobs/sweep.py --space tune_spaces/resolution_budget.yaml [--set k=v ...]`.

Thin wrapper: the sweep connects to the cluster in RAY_ADDRESS (set by `ray job submit`) and runs there.
"""

from __future__ import annotations

import sys

from reclip_ray.cli import run

if __name__ == "__main__":
    run(["sweep", *sys.argv[1:]])
