"""Where a small run's wall time goes before and between its steps: the launch, each phase's first batch, a restart.

Why: on 2 cores a 16-step `tiny` run of the test suite takes 30-40 s, of which its steps are about 3. The rest is
start-up that every launch, every phase and every restart pays: Ray Train's controller and workers (processes that
import torch and timm), the phase's split coordinator, and the first block each rank takes from its phase's stream.
That last one depends on ``data.block_mb``: a rank's first step waits for a whole block to be read and decoded, and
at 32 px an 8 MB block is a whole read unit (hundreds of rows) where ``data.block_mb=0`` gives 64 rows. On a GPU
node (many cores, a block decoded in well under a second) this matters little; on a CPU-only test machine it is
most of the data wait. The test suite's runs use ``data.block_mb=0`` (``tests/conftest.py``, FAST_START) from
this measurement.

Each run is the test suite's two-phase ``tiny`` run (2 workers, 1,024 samples of 64, 12 steps at 32 px then 4 at
64 px), with rank 1 failing once at 384 samples (a restart from the 256-sample checkpoint). The intervals come from
MLflow's metric timestamps (the steps' ``loss``, the new attempt's ``restarts``) and the fault marker's time, so
nothing in the trainer is instrumented. Usage (alone on the machine: it starts Ray)::

    python benchmarks/attempt_startup.py --block-mb 8 0 --repeats 2

Prints one JSON line per run: ``launch_to_first_step_s`` (``run_training`` called -> first step logged),
``fault_to_restart_s`` (fault -> the new attempt restored its checkpoint), ``restart_to_step_s`` (-> its first
step), ``phase_gap_s`` (phase 0's last step -> phase 1's first), ``median_step_s`` and ``wall_s``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def overrides(root: Path, data: Path, name: str, block_mb: float) -> list[str]:
    return [
        f"run.name={name}", f"run.storage_path={root / 'runs'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        "tracking.experiment=startup", f"data.train={data / 'train'}", f"data.eval={data / 'eval'}",
        f"data.tokenizer={data / 'tokenizer.json'}", "data.synth_if_missing=false", "data.shuffle_buffer=128",
        f"data.block_mb={block_mb:g}", "model.vision.depth=2", "model.text.depth=2", "train.samples=1024",
        "train.batch_size=64", "train.log_every_steps=1", "phases.0.samples=0.75", "phases.1.samples=0.25",
        "checkpoint.every_samples=256", "scaling.min_workers=2", "scaling.max_workers=2",
        "scaling.cpus_per_worker=0.5", "scaling.use_gpu=false", "eval.at_phase_end=false",
        "fault.fail_at_samples=384", "fault.fail_rank=1",
    ]


def timeline(root: Path, name: str, run_id: str, launched: float) -> dict[str, float]:
    """The intervals of one finished run, from its MLflow metrics (seconds)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    steps = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run_id, "loss")}
    phase = {m.step: m.value for m in client.get_metric_history(run_id, "phase")}
    fault = json.loads((root / "runs" / name / ".fault_injected").read_text())["time"]
    restarted = min(m.timestamp / 1000 for m in client.get_metric_history(run_id, "restarts") if m.value == 1)
    first_after = min(t for t in steps.values() if t > restarted)
    last0 = max(s for s in steps if phase[s] == 0)
    first1 = min(s for s in steps if phase[s] == 1)
    gaps = [steps[s] - steps[s - 1] for s in steps if s - 1 in steps and phase[s] == phase[s - 1]
            and not steps[s - 1] < restarted < steps[s]]
    return {"launch_to_first_step_s": steps[min(steps)] - launched, "fault_to_restart_s": restarted - fault,
            "restart_to_step_s": first_after - restarted, "phase_gap_s": steps[first1] - steps[last0],
            "median_step_s": statistics.median(gaps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--block-mb", type=float, nargs="+", default=[8.0, 0.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=4, help="Ray's logical CPUs (the test cluster's head: 4)")
    args = parser.parse_args()

    import ray

    from reclip_ray.config import load_config
    from reclip_ray.data.synth import make_synthetic
    from reclip_ray.data.tokenizer import train_tokenizer
    from reclip_ray.train.launch import run_training

    data = Path(tempfile.mkdtemp(prefix="startup-data-"))
    make_synthetic(data, train=600, eval=200, seed=0, shard_rows=200)
    train_tokenizer(data / "train", vocab_size=512, out=data / "tokenizer.json")
    ray.init(num_cpus=args.num_cpus, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        for repeat in range(args.repeats):  # interleaved, so that a slower minute of a shared machine hits both
            for block_mb in args.block_mb:
                root = Path(tempfile.mkdtemp(prefix="startup-run-"))
                name = f"b{block_mb:g}-{repeat}"
                launched = time.time()
                metrics = run_training(load_config("tiny", overrides(root, data, name, block_mb)))
                wall = time.time() - launched
                row = {"block_mb": block_mb, "repeat": repeat, "wall_s": wall,
                       **timeline(root, name, metrics["mlflow_run_id"], launched)}
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
