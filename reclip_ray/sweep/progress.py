"""What the sweep prints while Tune runs: one line per finished trial (Tune itself runs with ``verbose=0``)."""

from __future__ import annotations

import json
from typing import Any

from reclip_ray.run_names import EVAL_ERROR
from reclip_ray.sweep.space import trial_params


# The trials the last sweep run in this process left unfinished, as its progress callback saw them at the
# experiment's end. Tune returns normally from ``fit`` after a Ctrl-C (SIGINT) or SIGUSR1, with its state saved and
# every running trial marked terminated, just as if it had finished: this list is how ``run_sweep`` tells the two
# apart. Module state, looked up when the callback runs, because a resumed sweep runs the callback Tune pickled
# with the experiment (a copy of the class, by value), not one this process built.
UNFINISHED: list[str] = []


def progress_callback(metric: str, n_phases: int):
    """A Tune callback printing each trial's end: done, stopped early or error, with its metric, compute and
    parameters; and recording which trials did not end (``UNFINISHED``). Built here because Ray is imported only
    once a sweep runs."""
    from ray.tune import Callback

    class Progress(Callback):
        ended: set[str] | None = None  # trials finished before this run (a resumed sweep) or ended in it

        def on_step_begin(self, iteration, trials, **info):
            if self.ended is None:  # Tune's first step: what a resumed sweep had finished does not end again
                self.ended = {t.trial_id for t in trials if t.is_finished()}

        def on_trial_complete(self, iteration, trials, trial, **info):  # done, or stopped by the scheduler
            print(trial_line(trial.trial_id, trial.last_result or {}, trial.config, metric, n_phases, "done"),
                  flush=True)
            self._end(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(trial_line(trial.trial_id, trial.last_result or {}, trial.config, metric, n_phases, "error"),
                  flush=True)
            self._end(trial)

        def on_experiment_end(self, trials, **info):
            from reclip_ray.sweep.progress import UNFINISHED as unfinished  # the module's, not a pickled copy

            ended = self.ended if self.ended is not None else {t.trial_id for t in trials if t.is_finished()}
            unfinished[:] = [t.trial_id for t in trials if t.trial_id not in ended]

        def _end(self, trial):
            self.ended = (self.ended or set()) | {trial.trial_id}

    return Progress()


def trial_line(trial_id: str, result: dict[str, Any], config: dict[str, Any], metric: str, n_phases: int,
               how: str) -> str:
    rounds = result.get("eval_round", 0)  # phases finished (a compute-milestone report sits mid-phase)
    early = how == "done" and rounds < result.get("eval_rounds_planned", n_phases)
    return (f"[sweep] trial {trial_id} {'stopped early' if early else how}: "
            f"{metric}={result.get(metric, float('nan')):.4f} GFLOPs {result.get('gflops_total', float('nan')):.1f} "
            f"samples {result.get('samples', 0)} params {json.dumps(trial_params(config))}"
            + (f" ({result[EVAL_ERROR]})" if result.get(EVAL_ERROR) else ""))
