"""Driver side of a training run: prepare the inputs, open the MLflow run, hand the job to Ray Train, collect its
final metrics. ``run_training`` reads top to bottom; each step is a function below it.

A rerun of the same command resumes the run (Ray Train restores its latest checkpoint, the MLflow run is reopened)
or, when it already finished, returns its final metrics without training.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from reclip_ray import storage, tracking
from reclip_ray.config import Config
from reclip_ray.errors import ReclipError
from reclip_ray.lease import Lease
from reclip_ray.run_names import stream_layout
from reclip_ray.train.cluster import check_decode_device, init_ray, scaling_config, use_gpu
from reclip_ray.train.datasets import build_datasets
from reclip_ray.train.handover import check_stream_layout, clear_fatal
from reclip_ray.train.prepare import Prepared, prepare
from reclip_ray.train.run_state import final_eval, read_run_state, record_finished, write_run_state

PRINT_PATCH = "RAY_TRAIN_ENABLE_PRINT_PATCH"  # Ray Train V2's switch: its workers' print also goes to a logger


def run_training(
    cfg: Config,
    *,
    callbacks: list[Any] | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    console: bool = False,
    verbose: bool = False,
    relay: Any = None,
    exclusive: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the job described by ``cfg``; returns the final metrics. Ends the MLflow run in every case.

    ``callbacks`` go to Ray Train's RunConfig (a sweep passes Tune's report callback); ``parent_run_id`` nests the
    MLflow run under a sweep's parent run. ``console`` (the CLI) draws the run's progress in this process and sends
    Ray's own output to ``RUN_DIR/ray.log`` (unless ``verbose``). ``relay``: the tracking relay the workers
    use, when the caller made it (a sweep trial, whose relay sits on the sweep driver's node); else one is started
    here for a local store. ``exclusive``: hold the run folder's launch lease (``reclip_ray.lease``), so a second
    launch of a run that is still training refuses; a sweep's trial does not (the sweep holds its folder, and Tune
    runs one attempt of a trial at a time).
    """
    prep = prepare(cfg)
    with Lease(prep.run_dir) if exclusive else contextlib.nullcontext():  # or one line: another launch trains it
        state = read_run_state(prep.run_dir)  # read under the lease: the launch before may have just finished it
        if finished(prep, state):
            return dict(state["finished"])
        check_stream_layout(prep.run_dir, stream_layout(prep.cfg))  # or one line: it would resume another stream
        if console and not verbose:  # before MLflow's first call and Ray's start, so their start-up lines go there
            from reclip_ray.console import redirect_library_logging

            redirect_library_logging(prep.run_dir)
        attempt = Attempt(prep, open_mlflow_run(prep, state, tags, parent_run_id), relay)
        try:
            init_ray(prep.cfg)
            display = attempt.show_progress(verbose) if console else None
            trainer = build_trainer(prep, attempt, callbacks)
            result = fit(trainer, display)
            return attempt.final_metrics(result)
        except KeyboardInterrupt:
            attempt.status = "KILLED"
            raise
        finally:
            attempt.close()


def finished(prep: Prepared, state: dict[str, Any]) -> bool:
    """Whether the run already trained its whole schedule (then there is nothing to do)."""
    from reclip_ray.schedule import Schedule

    done = state.get("finished") or {}
    if done.get("samples") != Schedule.from_config(prep.cfg).total_samples:
        return False
    print(f"[reclip] run '{prep.run_name}' already finished ({done['samples']} samples); model at "
          f"{storage.join(prep.run_dir, 'model')}, MLflow run {done.get('mlflow_run_id')}. Nothing to do.", flush=True)
    return True


def open_mlflow_run(prep: Prepared, state: dict[str, Any], tags: dict[str, str] | None,
                    parent_run_id: str | None) -> str:
    """Reopen the run's MLflow run (a rerun, a restart) or create it, and count the attempt in the run state."""
    from reclip_ray.flops import run_flops

    cfg = prep.cfg
    flops = run_flops(cfg)
    tags = {
        "reclip.phases": " -> ".join(f"{p.name}:{p.image_size}px/{p.text_length}tok" for p in cfg.phases),
        "reclip.total_train_gflops": f"{flops['total_train_gflops']:.1f}",
        "reclip.run_dir": prep.run_dir,
        **(tags or {}),
    }
    run_id = tracking.start_or_resume_run(
        prep.tracking_uri, prep.experiment, prep.run_name, state.get("mlflow_run_id"), cfg, tags=tags,
        parent_run_id=parent_run_id,
    )
    resumed = bool(state.get("mlflow_run_id")) and state["mlflow_run_id"] == run_id
    write_run_state(prep.run_dir, {"mlflow_run_id": run_id, "tracking_uri": prep.tracking_uri,
                                   "attempts": state.get("attempts", 0) + 1})
    print(f"[reclip] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {prep.tracking_uri}", flush=True)
    return run_id


def build_trainer(prep: Prepared, attempt: Attempt, callbacks: list[Any] | None) -> Any:
    """The TorchTrainer of this attempt: the workers' loop and what it needs, one dataset factory per phase."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from reclip_ray.train.worker import train_loop_per_worker

    cfg = prep.cfg
    gpu = use_gpu(cfg)
    check_decode_device(cfg, gpu)
    tokenizer_json = storage.read_text(prep.tokenizer_path)
    clear_fatal(prep.run_dir)
    missing_actor, relay = attempt.start_actors()
    datasets = build_datasets(cfg, tokenizer_json, prep.run_dir, missing_actor)
    loop_config = {
        "config": cfg.to_dict(),
        "config_yaml": cfg.to_yaml(),
        "tokenizer_json": tokenizer_json,
        "tracking_uri": prep.tracking_uri,
        "mlflow_run_id": attempt.run_id,
        "run_dir": prep.run_dir,
        "missing_actor": missing_actor,
        "board": attempt.board,
        "tracking_relay": relay,
    }
    # Ray Train V2 patches the workers' print to log each line as well as print it: every line of the run's log
    # (ray.log, a sweep's trials, --verbose) came twice. Train propagates this variable from here to its workers.
    os.environ.setdefault(PRINT_PATCH, "0")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=cfg.train.collective_timeout_s),
        scaling_config=scaling_config(cfg, gpu),
        run_config=ray.train.RunConfig(
            name=prep.run_name,
            storage_path=storage.pyarrow_uri(cfg.run.storage_path),  # Ray parses it: same folder as prep.run_dir
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            callbacks=list(callbacks or []),
        ),
        datasets=datasets,
        dataset_config=data_config(cfg),
    )


def data_config(cfg: Config) -> Any:
    """Ray Train's DataConfig: each phase's stream is split over the workers (``streaming_split(equal=True)``, one
    coordinator actor per phase), except in a run that can only ever have one worker, which reads its phase's
    stream itself: the same rows in the same order, without a coordinator process per phase (~1.5 s of CPU and
    a process start before the phase's first batch)."""
    import ray.train

    single = cfg.scaling.max_workers == 1
    return ray.train.DataConfig(datasets_to_split=[] if single else "all")


def fit(trainer: Any, display: Any) -> Any:
    """``trainer.fit()`` under the progress display; the result, whose error is raised."""
    try:
        with display or contextlib.nullcontext():
            result = trainer.fit()
    except SystemExit:
        # Ray Train's own SIGINT handler (installed by fit() in the main thread) aborts the workers and then
        # exits from inside fit(); to the user that is a Ctrl-C like any other.
        raise KeyboardInterrupt from None
    if result.error is not None:
        raise result.error
    return result


class Attempt:
    """One launch of the run: its MLflow run and how it ends (FINISHED, FAILED, KILLED), the actors and the console
    it started, and what ``close`` owes the run in every case."""

    def __init__(self, prep: Prepared, run_id: str, relay: Any = None) -> None:
        self.prep, self.run_id = prep, run_id
        self.status = "FAILED"  # until final_metrics (or a Ctrl-C) says otherwise
        self.relay: Any = relay  # the workers' MLflow relay (a local store only): the caller's, or start_actors
        self.log_file: str | None = None  # Ray's output, when the console takes it off the screen
        self.board: Any = None  # the progress board the workers write to (the console only)

    def show_progress(self, verbose: bool) -> Any:
        """The CLI's console: Ray's output to ``RUN_DIR/ray.log`` (unless ``verbose``), a board for the workers'
        progress and the display that draws it (returned)."""
        from reclip_ray.console import ProgressDisplay, board_reader, get_board, ray_log_place, redirect_ray_output

        run_dir = self.prep.run_dir
        self.log_file = None if verbose else redirect_ray_output(run_dir)
        if self.log_file:
            print(f"[reclip] Ray's own output: {ray_log_place(run_dir, self.log_file)} (--verbose shows it here)",
                  flush=True)
        self.board = get_board(self.prep.run_name, create=True)
        return ProgressDisplay(board_reader(self.board))

    def start_actors(self) -> tuple[Any, Any]:
        """The run's missing-shards actor (only where shards may be skipped: otherwise a missing shard ends the run)
        and, for a local MLflow store, its tracking relay. Each actor is a Python process started with every
        attempt."""
        from reclip_ray.data.pipeline import get_or_create_missing_shards

        name = self.prep.run_name
        missing_actor = (get_or_create_missing_shards(f"reclip-missing-shards-{name}")
                         if self.prep.cfg.data.missing_shards == "skip" else None)
        uri = self.prep.tracking_uri
        if self.relay is None and tracking.is_local_store(uri):
            self.relay = tracking.start_store_relay(name, uri)
        return missing_actor, self.relay

    def final_metrics(self, result: Any) -> dict[str, Any]:
        """The run's final metrics (the last report, the exported evaluation, where the run lives), recorded in the
        run state; a run that stopped short without an error was aborted from outside."""
        from reclip_ray.schedule import Schedule

        prep = self.prep
        metrics = dict(result.metrics or {})
        expected = Schedule.from_config(prep.cfg).total_samples
        if metrics.get("samples") != expected:
            self.status = "KILLED"  # aborted from outside (Ctrl-C's graceful abort, a sweep stopping the trial)
            raise ReclipError(f"training stopped at {metrics.get('samples')} of {expected} samples "
                              "without an error (aborted?); rerun the same command to resume")
        self.status = "FINISHED"
        metrics["mlflow_run_id"] = self.run_id
        metrics["run_dir"] = prep.run_dir
        # Ray's Checkpoint.path is inside its filesystem (no s3:// scheme): name it under the run folder instead.
        metrics["checkpoint"] = (storage.join(prep.run_dir, storage.name(result.checkpoint.path))
                                 if result.checkpoint else None)
        metrics.update(final_eval(prep.run_dir))
        record_finished(prep.run_dir, metrics)
        return metrics

    def close(self) -> None:
        """Note the relay's work, end the MLflow run with the attempt's status, copy Ray's log to a remote run
        folder. Bookkeeping failures are warnings: they must not mask the run's own outcome."""
        self._note_relay()
        tracking.end_run(self.prep.tracking_uri, self.run_id, self.status)
        if self.log_file:  # the console's; a remote run folder gets this local ray.log
            from reclip_ray.console import copy_ray_log

            copy_ray_log(self.prep.run_dir, self.log_file)

    def _note_relay(self) -> None:
        """Record on the run where the workers' MLflow calls were written (the relay's node) and how many."""
        if self.relay is None:
            return
        import ray

        try:
            stats = ray.get(self.relay.stats.remote(), timeout=30)
            tracking.set_tags(self.prep.tracking_uri, self.run_id, {"reclip.tracking_relay_node": stats["node_id"],
                                                                    "reclip.tracking_relay_calls": stats["calls"]})
        except Exception as exc:  # noqa: BLE001 - bookkeeping about bookkeeping must not mask the run's outcome
            print(f"[reclip] WARNING: could not read the MLflow relay's statistics: {exc}", file=sys.stderr,
                  flush=True)
