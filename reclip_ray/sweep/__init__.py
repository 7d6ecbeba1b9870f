"""Ray Tune sweeps over RECLIP schedules at equal compute (``reclip-ray sweep --space tune_spaces/FILE.yaml``).

A search space is a YAML file (``tune_spaces/*.yaml``)::

    name: smoke
    base: tiny                       # preset name or config path (relative to the space file)
    set: ["train.batch_size=64"]     # overrides for every trial
    params:                          # dotted config paths (as --set), plus finetune_fraction; a grid runs
                                     # in this order, the first parameter varying fastest
      phases.0.image_size: {grid: [32, 48]}
      finetune_fraction: {grid: [0.1, 0.25]}
      phases.1.lr: {loguniform: [1.0e-5, 1.0e-3]}
    metric: eval/full/shape/top1     # eval/full/... = evaluated at the run's full resolution
    mode: max                        # default: min for loss, max for an evaluation
    budget: {gflops: 40}             # or {samples: 20000}: each trial's phase lengths are derived from it
    scheduler: {name: asha, grace_fraction: 0.25, reduction_factor: 2}   # time axis: training GFLOPs spent
    num_samples: 1
    max_concurrent_trials: 2

Each trial is a function trainable that builds and fits a ``TorchTrainer`` (Ray Train V2's way of nesting Train in
Tune); ``TuneReportCallback`` forwards what rank 0 reports at every phase end and at every compute milestone
(``tune_result``: a report whose evaluation failed carries the metric as NaN, so the sweep goes on).
Compute is the fair axis twice over: with a GFLOPs budget a 32 px main phase gets more samples than a 64 px one,
and ASHA compares trials at equal GFLOPs spent (``asha_axis``), not at phase ends, which fall at very different
compute for a RECLIP schedule and a full-resolution baseline; and at one resolution, the full one (``asha_metric``).

The modules, in the order a sweep uses them:

- ``space``: the YAML file read and checked (``load_space``), its domains in Tune's terms.
- ``trial_config``: one trial's config, its budget turned into phase lengths (``trial_raw``), its relative inputs
  resolved in the folder of the launch that runs it (``resolve_inputs``).
- ``asha``: the compute axis, the metric ASHA compares, the scheduler, what of a report reaches Tune.
- ``trainable``: what every trial shares (``trial_setup``) and the trial itself (``tune_trainable``).
- ``progress``: one printed line per finished trial.
- ``results`` and ``plot``: results.csv, best.yaml, pareto.png, and the trials' MLflow statuses.
- ``run``: ``run_sweep``, the steps above in order.

The names below are the package's public face (tests, the CLI, notebooks); the modules import one another
directly, never this package, so there is no import circle through it.
"""

from reclip_ray.sweep.asha import asha_axis, asha_metric, asha_milestones, make_scheduler, tune_result
from reclip_ray.sweep.plot import pareto_front
from reclip_ray.sweep.results import best_row, trial_rows
from reclip_ray.sweep.run import check_trials, check_trials_evaluate, run_sweep, sweep_from_cli
from reclip_ray.sweep.space import FINETUNE_FRACTION, Space, grid_corners, load_space, trial_params
from reclip_ray.sweep.trial_config import trial_raw

# Tune pickles a sweep's callbacks into its saved state; the progress callback of a sweep started before sweep.py
# became this package calls the old module's ``_public`` by that name when the sweep resumes.
_public = trial_params

__all__ = [
    "FINETUNE_FRACTION", "Space", "asha_axis", "asha_metric", "asha_milestones", "best_row", "check_trials",
    "check_trials_evaluate", "grid_corners", "load_space", "make_scheduler", "pareto_front", "run_sweep",
    "sweep_from_cli", "trial_params", "trial_raw", "trial_rows", "tune_result",
]
