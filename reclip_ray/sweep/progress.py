"""What the sweep prints while Tune runs: one line per finished trial (Tune itself runs with ``verbose=0``)."""

from __future__ import annotations

import json
from typing import Any

from reclip_ray.run_names import EVAL_ERROR
from reclip_ray.sweep.space import trial_params


def progress_callback(metric: str, n_phases: int):
    """A Tune callback printing each trial's end: done, stopped early or error, with its metric, compute and
    parameters. Built here because Ray is imported only once a sweep runs."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            print(trial_line(trial.trial_id, trial.last_result or {}, trial.config, metric, n_phases, "done"),
                  flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(trial_line(trial.trial_id, trial.last_result or {}, trial.config, metric, n_phases, "error"),
                  flush=True)

    return Progress()


def trial_line(trial_id: str, result: dict[str, Any], config: dict[str, Any], metric: str, n_phases: int,
               how: str) -> str:
    rounds = result.get("eval_round", 0)  # phases finished (a compute-milestone report sits mid-phase)
    early = how == "done" and rounds < result.get("eval_rounds_planned", n_phases)
    return (f"[sweep] trial {trial_id} {'stopped early' if early else how}: "
            f"{metric}={result.get(metric, float('nan')):.4f} GFLOPs {result.get('gflops_total', float('nan')):.1f} "
            f"samples {result.get('samples', 0)} params {json.dumps(trial_params(config))}"
            + (f" ({result[EVAL_ERROR]})" if result.get(EVAL_ERROR) else ""))
