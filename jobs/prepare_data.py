"""`ray job submit` entrypoint for dataset preparation: the same arguments as `reclip-ray data ...`.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare_data.py synth --out /shared/reclip_data --train 200000
    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/prepare_data.py shrink s3://bucket/my_data --sizes 40,80 --ray   # every node's CPUs
"""

import sys

from reclip_ray.cli import run

if __name__ == "__main__":
    run(["data", *sys.argv[1:]])
