"""The trial: a function trainable that builds its config and fits a ``TorchTrainer`` (Ray Train V2's way of
nesting Train in Tune), forwarding what rank 0 reports to Tune.

``trial_setup`` is what every trial shares (Tune hands it to each as ``config["_setup"]``); the trial reads it in
its own process, so the two are kept together here.
"""

from __future__ import annotations

import json
from typing import Any

from reclip_ray import storage
from reclip_ray.config import from_dict
from reclip_ray.sweep.asha import asha_metric, tune_result
from reclip_ray.sweep.space import Space, trial_params, trial_setup_of
from reclip_ray.sweep.trial_config import resolve_inputs, trial_raw
from reclip_ray.tracking_relay import home_node, use_relay


def trial_setup(space: Space, axis: dict[str, Any] | None, *, base_raw: dict[str, Any], sweep_dir: str,
                experiment: str, parent_run_id: str) -> dict[str, Any]:
    """Plain data, so Tune can store it with its experiment state and a resumed sweep gets it back."""
    return {
        "base_raw": base_raw,
        "budget": space.budget,
        "sweep": space.name,
        "trials_dir": storage.join(sweep_dir, "trials"),
        "experiment": experiment,
        "parent_run_id": parent_run_id,
        "milestones": axis["milestones"] if axis else [],
        # Tune checks ASHA's metric (and, without ASHA, the sweep's) in every result (tune_result)
        "checked_metrics": sorted({space.metric, asha_metric(space)} if axis else {space.metric}),
    }


def tune_trainable(space: Space, launch_dir: str) -> Any:
    """The trial as Tune runs it, with its CPU share. Its name, ``_run_trial``, is part of every sweep's saved
    state: ``Tuner.restore`` refuses a trainable of another name, so an interrupted sweep resumes only under it
    (``tune.with_parameters`` keeps it).

    ``launch_dir`` is the working directory of this launch of the sweep, which relative inputs name places in
    (``trial_run_raw``). It goes through ``with_parameters``, not the trials' config: Tune saves that at the sweep's
    start and resumes every trial with it, while a rerun passes its trainable again."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(_run_trial, launch_dir=launch_dir),
                               {"cpu": space.resources_per_trial_cpu})


def trial_run_raw(config: dict[str, Any], trial_id: str, launch_dir: str) -> dict[str, Any]:
    """The raw config trial ``trial_id`` trains: the base config + its parameters, under the budget (its Tune
    ``config``: both as the sweep started), its relative inputs resolved against ``launch_dir``, the working
    directory of the launch running it (``trial_config.resolve_inputs``: a resumed sweep's may be another
    ``ray job submit``'s copy of the files), its outputs in the sweep's folder and MLflow experiment."""
    setup = trial_setup_of(config)
    raw = resolve_inputs(trial_raw(setup["base_raw"], trial_params(config), setup["budget"]), launch_dir)
    raw["run"]["name"] = f"{setup['sweep']}-{trial_id}"
    raw["run"]["storage_path"] = setup["trials_dir"]
    raw.setdefault("tracking", {})["experiment"] = setup["experiment"]
    raw.setdefault("eval", {})["at_gflops"] = list(setup.get("milestones") or [])  # report at ASHA's rungs
    return raw


def _run_trial(config: dict[str, Any], launch_dir: str) -> None:
    """One trial: the base config + this trial's parameters, under the budget, trained by Ray Train."""
    import ray.tune

    from reclip_ray.train.launch import run_training

    setup = trial_setup_of(config)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = from_dict(trial_run_raw(config, trial_id, launch_dir))
    relay = trial_relay(setup["sweep"], cfg)
    use_relay(relay)  # this process's own MLflow calls (the run's start and end) go there too
    try:
        run_training(cfg, callbacks=[_tune_reports(setup.get("checked_metrics") or [])],
                     parent_run_id=setup["parent_run_id"],
                     tags={"reclip.sweep": setup["sweep"], "reclip.trial_id": trial_id,
                           "reclip.budget": json.dumps(setup["budget"])}, relay=relay, exclusive=False)
    finally:
        use_relay(None)  # Tune may run another trial in this process


def sweep_home(sweep: str) -> str:
    """The name of the actor that marks the sweep driver's node (``tracking_relay.mark_home``)."""
    return f"reclip-sweep-home-{sweep}"


def trial_relay(sweep: str, cfg: Any) -> Any:
    """For a local MLflow store, the trial's relay, on the sweep driver's node (``sweep_home``), where the store is.

    A training run's driver is where the store is, and its workers write through a relay beside it. A trial is a
    driver too, but Tune places it on any node, where a SQLite path is that node's own file: the trial's run
    would land there, unseen. So its relay, for its own calls and its workers', is pinned to the sweep driver's
    node. None for a server store (everyone writes to it directly)."""
    from reclip_ray import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    if not tracking.is_local_store(uri):
        return None
    return tracking.start_store_relay(cfg.run.name, uri, node_id=home_node(sweep_home(sweep)))


def _tune_reports(checked: list[str]):
    """Ray Tune's report callback, forwarding what ``tune_result`` lets through (``checked``: the metrics Tune
    checks)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class TuneReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):  # Ray passes these by keyword
            result = tune_result(metrics[0], checked) if metrics else None
            if result is not None:
                super().after_report(run_context=run_context, metrics=[result, *metrics[1:]], checkpoint=checkpoint)

    return TuneReports()
