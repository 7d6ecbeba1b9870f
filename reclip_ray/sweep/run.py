"""Running a sweep, in four steps: check every trial's config before Ray starts, open the sweep (its folder and
its MLflow parent run), let Tune run the trials, write the results. Rerunning an interrupted sweep resumes it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reclip_ray import storage
from reclip_ray.config import CONFIG_PRESETS, Config, ConfigError, apply_overrides, from_dict, load_raw
from reclip_ray.flops import run_flops
from reclip_ray.lease import Lease
from reclip_ray.run_names import FULL
from reclip_ray.sweep.asha import asha_axis, asha_metric, asha_mode, check_metric_names, make_scheduler
from reclip_ray.sweep.progress import UNFINISHED, progress_callback
from reclip_ray.sweep.results import (close_trial_runs, kill_running_trial_runs, trial_configs, trial_rows,
                                      write_outputs)
from reclip_ray.sweep.space import Space, grid_corners, load_space, tune_param_space
from reclip_ray.sweep.trainable import sweep_home, trial_setup, tune_trainable
from reclip_ray.sweep.trial_config import keep_relative_inputs, trial_raw
from reclip_ray.tracking_relay import mark_home


@dataclass
class OpenSweep:
    """A sweep whose folder and MLflow parent run exist: what the trials and the results need of it."""

    prep: Any  # train.launch.Prepared of the base config: data, tokenizer, tracking URI, absolute paths
    sweep_dir: str  # a local folder or a URI (storage.py): Tune, the trials and the outputs all go there
    base_raw: dict[str, Any]  # the prepared base config, inputs given relative kept so: every trial's starting point
    launch_dir: str  # this launch's working directory, which relative inputs name places in
    experiment: str
    parent: str  # the MLflow parent run's id
    lease: Lease  # the sweep folder's launch lease: released when the sweep ends


def run_sweep(space_path: str, config: str | None = None, overrides: list[str] | None = None,
              quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) a sweep; writes results.csv, pareto.png and best.yaml in the sweep folder. ``quiet`` (the
    CLI's default): Ray's output, the trials' training logs included, goes to the sweep folder's ray.log, and the
    console shows the sweep's own lines, errors and warnings."""
    from reclip_ray import tracking
    from reclip_ray.console import copy_ray_log, ray_log_place, redirect_ray_output
    from reclip_ray.train.launch import init_ray

    space = load_space(space_path)
    base_raw = apply_overrides(load_raw(config or space.base), space.overrides + list(overrides or []))
    base_cfg = from_dict(base_raw)
    axis = check_trials(space, base_raw)
    sweep = open_sweep(space, space_path, base_cfg, quiet,
                       definition=sweep_definition(space, config, list(overrides or [])))
    n_phases = len(base_cfg.phases)
    status = "FAILED"
    log_file = None
    try:
        init_ray(sweep.prep.cfg)
        log_file = redirect_ray_output(sweep.sweep_dir, own_warnings=True) if quiet else None
        if log_file:
            print(f"[sweep] Ray's own output and the trials' training logs: {ray_log_place(sweep.sweep_dir, log_file)}"
                  " (--verbose shows them here)", flush=True)
        # A local store is on this node: each trial, wherever Tune places it, writes through a relay pinned here.
        home = mark_home(sweep_home(space.name)) if tracking.is_local_store(sweep.prep.tracking_uri) else None
        UNFINISHED.clear()
        with _tune_console(quiet), _tune_loggers_without_tensorboard():
            grid = _tuner(space, sweep, axis, n_phases).fit()
        del home  # the trials are done: the marker goes with its last handle
        summary = finish_sweep(grid, space, sweep, n_phases)
        status = "FINISHED"
        if summary["errors"]:
            print(f"[sweep] {summary['errors']} trial(s) failed (results.csv: status 'error' and why): run the same "
                  "command again to resume them from their last checkpoints", flush=True)
        return summary
    except (KeyboardInterrupt, SystemExit):
        # Tune's graceful stop on a Ctrl-C closed the trials' runs above. A second Ctrl-C (which skips it), or
        # `ray job stop` (SIGTERM, on which Ray's driver exits from inside Tune's loop), leaves them RUNNING.
        status = "KILLED"
        kill_running_trial_runs(sweep.prep.tracking_uri, sweep.parent)
        raise KeyboardInterrupt from None  # to the user, a stop (the CLI says so and exits 130)
    finally:
        try:
            tracking.end_run(sweep.prep.tracking_uri, sweep.parent, status)
            copy_ray_log(sweep.sweep_dir, log_file)
        finally:
            sweep.lease.release()


def finish_sweep(grid: Any, space: Space, sweep: OpenSweep, n_phases: int) -> dict[str, Any]:
    """Once Tune returns: the trials' rows, their MLflow runs closed as Tune saw them, and the outputs (best.yaml
    from the best trial's own config, as Tune kept it: ``results.trial_configs``). A sweep Tune returned from with
    trials unfinished (a Ctrl-C, SIGUSR1: its state saved) writes no outputs and stops (KeyboardInterrupt)."""
    rows = trial_rows(grid, space, n_phases)
    close_trial_runs(sweep.prep.tracking_uri, sweep.parent, rows)
    if UNFINISHED:
        print(f"[sweep] interrupted with {len(UNFINISHED)} trial(s) unfinished: run the same command "
              "again to resume them from their last checkpoints", flush=True)
        raise KeyboardInterrupt
    return write_outputs(rows, space, trial_configs(grid), sweep_dir=sweep.sweep_dir,
                         storage_path=sweep.prep.cfg.run.storage_path, tracking_uri=sweep.prep.tracking_uri,
                         parent=sweep.parent)


@contextlib.contextmanager
def _tune_console(quiet: bool):
    """What Tune prints while the sweep runs, less what misleads or repeats.

    * Tune's advice on an interrupted sweep ("Resume experiment with: Tuner.restore(...)") is for its Python API;
      the sweep says how to resume instead (run the same command), so the advice is dropped.
    * Quiet: Tune's console output (``RAY_AIR_NEW_OUTPUT``, on by default) prints an experiment header, its results
      path and a TensorBoard hint at any verbosity, ``verbose=0`` included; its legacy output at ``verbose=0``
      prints nothing, and is used while Tune runs unless the user chose either."""
    tune_log = logging.getLogger("ray.tune.tune")

    def no_advice(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Experiment has been interrupted")

    tune_log.addFilter(no_advice)
    legacy = quiet and "RAY_AIR_NEW_OUTPUT" not in os.environ
    try:
        with _environ("RAY_AIR_NEW_OUTPUT", "0" if legacy else None):
            yield
    finally:
        tune_log.removeFilter(no_advice)


def _tune_loggers_without_tensorboard() -> contextlib.AbstractContextManager:
    """Tune's per-trial logs (result.json, progress.csv: what ``Tuner.restore(...).get_results()`` reads), but not
    its TensorBoard event files.

    Tune adds a CSV, a JSON and a TensorBoard logger to every run unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS`` is
    set; the sweep's ``RunConfig`` names the first two itself (``_tuner``). The TensorBoard logger imports
    tensorboardX, and with it torch, into a driver that otherwise never loads torch (its trials do), for event files
    that repeat what MLflow has. Without it a one-trial sweep's driver used 8.0-8.8 CPU seconds instead of
    10.4-11.6, and 369 MB at its peak instead of 850 (``benchmarks/sweep_driver.py``, BENCHMARKS.md)."""
    return _environ("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    """``name`` set to ``value`` in this process's environment while the block runs (Tune reads these switches
    there, inside ``fit``), then put back as it was; ``value`` None leaves it alone."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if before is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = before


def check_trials(space: Space, base_raw: dict[str, Any]) -> dict[str, Any] | None:
    """Every trial's config (and its budget), checked before Ray starts: a bad grid value is a one-line error now.
    Returns ASHA's compute axis (``asha.asha_axis``) from the trials' total GFLOPs; None without ASHA."""
    check_metric_names(space)
    corners = [_trial_config(base_raw, combo, space) for combo in grid_corners(space)]
    check_trials_evaluate(space, corners)
    totals = [run_flops(cfg)["total_train_gflops"] for cfg in corners]
    return asha_axis(space, totals) if space.scheduler["name"] == "asha" else None


def _trial_config(base_raw: dict[str, Any], params: dict[str, Any], space: Space) -> Config:
    """One trial's checked config; its error names the trial's parameters (a value Tune may draw, not one the
    space file shows: ``uniform: [32, 64]`` draws 48.5)."""
    try:
        return from_dict(trial_raw(base_raw, params, space.budget))
    except ConfigError as exc:
        raise ConfigError(f"sweep trial {json.dumps(params)}: {exc}") from None


def check_trials_evaluate(space: Space, configs: list[Config]) -> None:
    """A sweep that compares evaluations needs trials that evaluate: one line before Ray, not a NaN row per trial
    after all their training (a trial whose evaluation fails at run time still trains on: ``tune_result``)."""
    needs_eval = [m for m in (space.metric, asha_metric(space)) if m.startswith(FULL)]
    for cfg in configs:
        if needs_eval and not cfg.data.eval:
            raise ConfigError(f"metric {needs_eval[0]} needs an eval set, but data.eval is empty")
        if space.metric.startswith(FULL) and not cfg.eval.at_phase_end:
            raise ConfigError(f"metric {space.metric} is each trial's evaluation at its end, but "
                              "eval.at_phase_end is false")


def check_metrics_in_eval_set(space: Space, eval_set: dict[str, Any] | None, path: str) -> None:
    """An ``eval/full/...`` metric names a label set of the eval set (or its retrieval): one it lacks (``color``
    for ``colour``) reaches no report, and Tune fails the whole sweep at the first trial's first rung or phase end.
    Checked against the eval set ``prepare`` read (``eval_set``: ``check_eval_set``'s summary), unless the space
    varies ``data.*``: a trial may then read another set, or other columns."""
    if eval_set is None or any(key.startswith("data.") for key in space.params):
        return
    compared = {space.metric} | ({asha_metric(space)} if space.scheduler["name"] == "asha" else set())
    for metric in sorted(m for m in compared if m.startswith(FULL)):
        what = metric[len(FULL):]
        if what.startswith(("image_to_text_r@", "text_to_image_r@")):
            if not eval_set["has_captions"]:
                raise ConfigError(f"metric {metric}: the eval set {path} has no captions to retrieve")
        elif what.rsplit("/", 1)[0] not in eval_set["label_sets"]:
            raise ConfigError(f"metric {metric}: the eval set {path} has no label set {what.rsplit('/', 1)[0]!r}; "
                              f"its label sets: {', '.join(eval_set['label_sets']) or 'none'}")


def open_sweep(space: Space, space_path: str, base_cfg: Config, quiet: bool = False,
               definition: dict[str, Any] | None = None) -> OpenSweep:
    """Prepare the base config under the space's name (its run folder is the sweep folder), and start the sweep's
    MLflow parent run, or resume the one ``sweep_state.json`` names, if it started with the same ``definition``
    (``sweep_definition``). ``quiet``: Ray's and MLflow's logging go to the sweep folder's ray.log from before their
    first lines (``redirect_library_logging``)."""
    from reclip_ray.console import redirect_library_logging
    from reclip_ray.train.launch import prepare

    base_cfg.run.name = space.name
    given, launch_dir = base_cfg.to_dict(), os.getcwd()
    prep = prepare(base_cfg)  # data (synthetic if missing), tokenizer, tracking URI, absolute paths
    check_metrics_in_eval_set(space, prep.eval_set, prep.cfg.data.eval)
    sweep_dir = prep.run_dir
    lease = Lease(sweep_dir).take()  # or one line: the same sweep is running (reclip_ray.lease)
    try:
        if storage.local_path(sweep_dir):
            storage.makedirs(sweep_dir)
        if quiet:
            redirect_library_logging(sweep_dir)
        base_raw = keep_relative_inputs(prep.cfg.to_dict(), given)  # a rerun's trials resolve them in its folder
        base_raw["data"]["synth_if_missing"] = False
        experiment = prep.cfg.tracking.experiment or f"sweep-{space.name}"
        parent = _parent_run(space, Path(space_path).read_text(), prep, sweep_dir, experiment, definition)
    except BaseException:
        lease.release()
        raise
    return OpenSweep(prep=prep, sweep_dir=sweep_dir, base_raw=base_raw, launch_dir=launch_dir,
                     experiment=experiment, parent=parent, lease=lease)


def sweep_definition(space: Space, config: str | None, overrides: list[str]) -> dict[str, Any]:
    """What decides a sweep's trials and how Tune runs them: the space as read, its base replaced by ``--config``
    and ``--set`` after its own ``set``, as plain data (``sweep_state.json`` keeps it).

    A base file counts by the mapping read from it (``load_raw``: the one file a config is, no other; a comment or
    its absolute path, which differs between two ``ray job submit``s of one sweep, each in a new working folder, does
    not count). A preset (``base: tiny``, ``model: vit-b-16``) counts by its name, not by what the installed
    reclip-ray holds for it: an upgrade that changes a preset is no edit of the sweep, and does not reach it. Tune
    resumes every trial, the ones not yet started too, with the base config saved at the sweep's start (each trial's
    ``_setup``; ``tune.run`` does not read a restored sweep's ``param_space`` again), so the sweep goes on as it
    started; refusing would only strand it. Its input paths given relative are kept so there, and each launch's
    trials resolve them in that launch's folder (``trial_config.keep_relative_inputs``). A user's edit of the base
    file does not reach the trials either, but was meant to: that is refused (``_continues_sweep``). Earlier
    versions recorded a YAML base by its text (``_changed_keys`` reads that form too)."""
    base = config or space.base
    raw: Any = base if base in CONFIG_PRESETS else load_raw(base)
    return json.loads(json.dumps({**dataclasses.asdict(space), "base": raw, "overrides": space.overrides + overrides}))


def _changed_keys(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys in which the definition a sweep started with (``sweep_state.json``) differs from ``now``.

    Read in the forms earlier versions wrote: a YAML base as its text, compared by the mapping
    it parses to (the name a file without one takes from its stem, which the text lacks, aside); a base file of
    another suffix as its path, whose content the record never held (as before, not compared). And a ``mode: max``
    with ``metric: loss`` (the default for loss before 2026-12-07, refused since) reads as the ``min`` that space
    gives now: only ASHA acted on it, and ``_check_saved_asha`` refuses a sweep whose ASHA did."""
    before = dict(before)
    old_base = before.get("base")
    if isinstance(old_base, str) and isinstance(now.get("base"), dict):
        parsed = yaml.safe_load(old_base) if old_base not in CONFIG_PRESETS else old_base
        if isinstance(parsed, dict):
            before["base"] = {**parsed, **({} if "name" in parsed else {"name": now["base"].get("name")})}
        elif old_base not in CONFIG_PRESETS:
            before["base"] = now["base"]
    if before.get("metric") == "loss" and before.get("mode") == "max":
        before["mode"] = "min"
    return [k for k in now if json.dumps(before.get(k), sort_keys=True) != json.dumps(now[k], sort_keys=True)]


def _saved_asha(tune_dir: str) -> tuple[str, str] | None:
    """The metric and mode of the ASHA scheduler Tune saved with a sweep (``tuner.pkl``, written when the sweep's
    Tuner was made, and what ``Tuner.restore`` resumes the sweep with: its scheduler is not made again); None for
    another scheduler, or a state this cannot read (``Tuner.restore`` then says why)."""
    import ray.cloudpickle as pickle
    from ray.tune.schedulers import AsyncHyperBandScheduler

    try:
        state = pickle.loads(storage.read_bytes(storage.join(tune_dir, "tuner.pkl")))
        scheduler = state["_tune_config"].scheduler
    except Exception:  # noqa: BLE001 - anything: the sweep resumes as it would have, and Tune reports it
        return None
    if not isinstance(scheduler, AsyncHyperBandScheduler) or getattr(scheduler, "_mode", None) not in ("max", "min"):
        return None
    return str(scheduler.metric), scheduler._mode


def _check_saved_asha(space: Space, tune_dir: str) -> None:
    """A sweep whose saved ASHA ranks its metric the other way than this space's would is refused: a sweep started
    before ``mode`` defaulted to ``min`` for ``metric: loss`` (2026-12-07), or before a ``scheduler.metric: loss``
    was minimised (7a709bb), has ASHA keep the trials with the highest loss at each rung. ``Tuner.restore`` resumes
    it with that scheduler, and the trials it stopped for learning most stay stopped, while the results would rank
    by the space's mode: no resume makes that one sweep, so one line before Ray starts says to run it afresh."""
    saved = _saved_asha(tune_dir) if space.scheduler["name"] == "asha" else None
    if saved is None or saved[0] != asha_metric(space) or saved[1] == asha_mode(space):
        return
    most = "highest" if saved[1] == "max" else "lowest"
    raise ConfigError(f"{storage.parent(tune_dir)}: the sweep there has Tune's ASHA keep the trials with the {most} "
                      f"{saved[0]} at each rung (mode {saved[1]}: it started before a loss was minimised by default), "
                      f"and a rerun resumes it with that scheduler, where this space's uses mode {asha_mode(space)}: "
                      "give this sweep another name (the space's name:) to run it afresh")


def _continues_sweep(state: dict[str, Any], definition: dict[str, Any] | None, sweep_dir: str,
                     space: Space) -> bool:
    """Whether this run continues the sweep in the folder: it started with ``definition``. Where it did not and
    Tune has its state there, a refusal: a rerun resumes a sweep as it started (``Tuner.restore`` keeps its trials'
    configs, its scheduler and its limits), so a space edited since would report the old trials as its own, or, for
    a changed domain, fail on MLflow's refusal to change the parent run's params. One line before Ray starts
    instead. Without Tune's state no trial of it ran: False, and the caller starts afresh. With Tune's state, a
    scheduler saved ranking the other way than ``space``'s is refused too (``_check_saved_asha``), whatever the
    record says (a sweep started before the record existed has none)."""
    from ray import tune

    tune_dir = storage.join(sweep_dir, "tune")
    restorable = tune.Tuner.can_restore(storage.pyarrow_uri(tune_dir))
    before = state.get("definition")
    changed = _changed_keys(before, definition) if before is not None and definition is not None else []
    if changed and not restorable:
        return False
    if changed:
        changed = ["set (or --set)" if k == "overrides" else "base (or --config)" if k == "base" else k
                   for k in changed]
        raise ConfigError(f"{sweep_dir}: the sweep there started with another {', '.join(changed)}, and a rerun "
                          "resumes it as it started: rerun it as it was to resume it, or give this one another name")
    if restorable:  # the same sweep, or one started before this check: as is, unless Tune would resume it otherwise
        _check_saved_asha(space, tune_dir)
    return True


def _parent_run(space: Space, space_text: str, prep: Any, sweep_dir: str, experiment: str,
                definition: dict[str, Any] | None = None) -> str:
    from reclip_ray import tracking

    state_path = storage.join(sweep_dir, "sweep_state.json")
    state = storage.read_json(state_path, default={})
    if not _continues_sweep(state, definition, sweep_dir, space):
        state = {}  # it never got to Tune: this sweep starts afresh, in a parent run of its own
    parent = tracking.start_or_resume_run(
        prep.tracking_uri, experiment, space.name, state.get("parent_run_id"), prep.cfg,
        tags={"reclip.sweep": space.name, "reclip.space": space_text[:5000]},
    )
    storage.write_json(state_path, {"parent_run_id": parent, "experiment": experiment,
                                    "definition": state.get("definition") or definition})
    tracking.log_params(prep.tracking_uri, parent, {f"space.{k}": json.dumps(v) for k, v in space.params.items()}
                        | {"space.budget": json.dumps(space.budget), "space.metric": space.metric})
    return parent


def _tuner(space: Space, sweep: OpenSweep, axis: dict[str, Any] | None, n_phases: int):
    """Tune's Tuner for the sweep: restored from the sweep folder when an earlier run of it was interrupted."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    setup = trial_setup(space, axis, base_raw=sweep.base_raw, sweep_dir=sweep.sweep_dir,
                        experiment=sweep.experiment, parent_run_id=sweep.parent)
    param_space = tune_param_space(space, setup)
    scheduler = make_scheduler(space, axis)
    if axis:
        print(f"[sweep] ASHA on training GFLOPs: compares {asha_metric(space)} at "
              f"{', '.join(f'{m:,.0f}' for m in axis['milestones'])} GFLOPs", flush=True)
    trainable = tune_trainable(space, sweep.launch_dir)
    tune_dir = storage.join(sweep.sweep_dir, "tune")
    run_config = tune.RunConfig(
        name="tune", storage_path=storage.pyarrow_uri(sweep.sweep_dir), verbose=0,  # Tune parses it as a URI
        # Tune's own per-trial logs, named here because its defaults, TensorBoard's included, are off while the
        # sweep runs (_tune_loggers_without_tensorboard)
        callbacks=[progress_callback(space.metric, n_phases), CSVLoggerCallback(), JsonLoggerCallback()],
    )
    if tune.Tuner.can_restore(storage.pyarrow_uri(tune_dir)):
        print(f"[sweep] resuming {tune_dir}", flush=True)
        return restore_tuner(tune_dir, trainable, space, setup)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(  # ASHA has its own metric (asha_metric); Tune refuses two
            metric=None if axis else space.metric, mode=None if axis else space.mode, scheduler=scheduler,
            num_samples=space.num_samples, max_concurrent_trials=space.max_concurrent_trials,
        ),
        run_config=run_config,
    )


def restore_tuner(tune_dir: str, trainable: Any, space: Space, setup: dict[str, Any]) -> Any:
    """The interrupted sweep's Tuner, its unfinished and errored trials to run again.

    Tune refuses a ``param_space`` whose keys differ from the original's, and a sweep started before 2026-12-05
    has its parameters under their bare paths and ``_setup`` as a dict (``tune_param_space``): that one is
    restored in its own format, so a sweep interrupted before an upgrade still resumes after it."""
    from ray import tune

    def restore(legacy: bool) -> Any:
        return tune.Tuner.restore(storage.pyarrow_uri(tune_dir), trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=tune_param_space(space, setup, legacy=legacy))

    try:
        return restore(legacy=False)
    except ValueError as exc:  # "Invalid `param_space` input to `Tuner.restore()`": the keys differ
        if "param_space" not in str(exc):
            raise
    return restore(legacy=True)


def sweep_from_cli(space: str, config: str | None, overrides: list[str], verbose: bool = False) -> int:
    summary = run_sweep(space, config, overrides, quiet=not verbose)
    print(json.dumps(summary, indent=2, default=str))
    return 0
