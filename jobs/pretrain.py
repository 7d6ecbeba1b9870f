"""`ray job submit` entrypoint for training: the same arguments as `reclip-ray train`.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py --config vit-b-16 --set data.train=s3://bucket/train
"""

import sys

from reclip_ray.cli import run

if __name__ == "__main__":
    run(["train", *sys.argv[1:]])
