"""Driver side of a training run: check inputs, prepare data and tracking, then hand over to Ray Train.

Everything that can fail because of a user mistake (config, paths, schema) is checked here *before* Ray starts, so
the user sees one line instead of a worker traceback three minutes later.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reclip_ray import storage
from reclip_ray.config import Config, ConfigError, absolute, load_config
from reclip_ray.errors import DataError, ReclipError
from reclip_ray.run_names import (CHECKPOINT_SNAPSHOT, DATA_START_DIR, FATAL_FILE, RUN_STATE_FILE, phase_dataset_name,
                                  phase_seed, shuffle_buffer_rows)



@dataclass
class Prepared:
    cfg: Config
    run_name: str
    run_dir: str
    tokenizer_path: str
    tracking_uri: str
    experiment: str


def prepare(cfg: Config) -> Prepared:
    """Resolve paths, make the synthetic data if asked, check shards and schema, get a tokenizer. No Ray yet."""
    from reclip_ray import tracking
    from reclip_ray.data.schema import ColumnMap, check_schema
    from reclip_ray.data.shards import list_parquet_files

    data = cfg.data
    data.train = absolute(data.train)
    data.eval = absolute(data.eval) if data.eval else ""
    cfg.run.storage_path = absolute(cfg.run.storage_path)
    run_name = cfg.run.name or cfg.name
    cfg.run.name = run_name
    run_dir = storage.join(storage.normalize(cfg.run.storage_path), run_name)  # a local folder or a URI
    if cfg.model.init_from and not latest_checkpoint_state(run_dir)[0]:
        from reclip_ray.init_weights import check_init_from  # a resumed run ignores it: the checkpoint wins

        cfg.model.init_from = check_init_from(cfg.model.init_from)

    if not storage.is_uri(data.train) and not os.path.exists(data.train):
        if not data.synth_if_missing:
            raise DataError(f"data.train not found: {data.train}")
        _make_synthetic(cfg)

    columns = ColumnMap.from_config(data)
    check_schema(list_parquet_files(data.train), columns)
    if data.eval:
        if not storage.is_uri(data.eval) and not os.path.exists(data.eval):
            raise DataError(f"data.eval not found: {data.eval} (set data.eval='' to train without evaluation)")
        from reclip_ray.evaluation.eval_set import check_eval_set, eval_columns

        sizes = [p.image_size for p in cfg.phases] + ([cfg.eval.full_image_size] if cfg.eval.full_image_size else [])
        summary = check_eval_set(data.eval, eval_columns(data.eval, columns), sizes, cfg.model.vision.patch_size)
        sets = ", ".join(f"{name} ({n} classes)" for name, n in summary["label_sets"].items()) or "none"
        print(f"[reclip] eval set: {summary['rows']} rows; zero-shot label sets: {sets}; "
              f"retrieval: {'yes' if summary['has_captions'] else 'no captions'}", flush=True)

    tokenizer_path = _ensure_tokenizer(cfg, run_dir)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    cfg.tracking.uri = tracking_uri
    return Prepared(cfg, run_name, run_dir, tokenizer_path, tracking_uri, cfg.tracking.experiment or cfg.name)


def _make_synthetic(cfg: Config) -> None:
    from reclip_ray.data.copies import shrink_dataset, sizes_for_phases
    from reclip_ray.data.synth import IMAGE_SIZE as SYNTH_IMAGE_SIZE, make_synthetic

    train, evald = cfg.data.train, cfg.data.eval or None
    root = storage.parent(train)
    if storage.name(train) != "train" or (evald is not None and evald.rstrip("/") != storage.join(root, "eval")):
        raise DataError(
            f"data.synth_if_missing needs data.train=DIR/train and data.eval=DIR/eval, got {train} and {evald}"
        )
    print(f"[reclip] making the synthetic captioned-shapes dataset under {root} ...", flush=True)
    make_synthetic(root, train=cfg.data.synth_train, eval=cfg.data.synth_eval, seed=cfg.train.seed)
    # Shrunk copies for the config's phases (e.g. 40 px for 32, 72 px for 64), as `data synth --shrink` makes.
    sizes = sizes_for_phases([p.image_size for p in cfg.phases], source_side=SYNTH_IMAGE_SIZE)
    if sizes and cfg.data.use_copies:
        shrink_dataset(train, sizes, image_column=cfg.data.image_column, log=None)


def _ensure_tokenizer(cfg: Config, run_dir: str) -> str:
    """The config's tokenizer (a file or a URI), else one trained on data.train and kept in the run folder (reused
    on resume; the run folder may be a URI too)."""
    from reclip_ray.data.tokenizer import CaptionTokenizer, load_tokenizer, train_tokenizer

    if cfg.data.tokenizer == "clip" and not Path("clip").exists():
        from reclip_ray.data.clip_bpe import clip_tokenizer_file  # OpenAI's BPE, converted once from open_clip's

        path = str(clip_tokenizer_file())
        load_tokenizer(path)  # fail now (e.g. no ftfy)
        return path
    if cfg.data.tokenizer:
        path = absolute(cfg.data.tokenizer)
        if storage.is_uri(path):
            try:
                CaptionTokenizer.from_json(storage.read_text(path))  # fail now on a bad file
            except FileNotFoundError:
                raise ReclipError(f"data.tokenizer not found: {path}") from None
        else:
            if not os.path.isfile(path):
                raise ReclipError(f"data.tokenizer not found: {path}")
            load_tokenizer(path)  # fail now on a bad file
        cfg.data.tokenizer = path
        return path
    path = storage.join(run_dir, "tokenizer.json")
    if not storage.is_file(path):
        bound = cfg.data.tokenizer_sample_captions
        sample = f"the first {bound:,} captions of" if bound else "every caption of"
        print(f"[reclip] training a {cfg.data.vocab_size}-token BPE tokenizer on {sample} {cfg.data.train} "
              "(data.tokenizer_sample_captions) ...", flush=True)
        tokenizer = train_tokenizer(cfg.data.train, vocab_size=cfg.data.vocab_size,
                                    caption_column=cfg.data.caption_column, max_captions=bound)
        storage.write_text(path, tokenizer.to_json())
    cfg.data.tokenizer = path
    return path


def _final_eval(run_dir: str) -> dict[str, float]:
    """The last evaluation, as the workers exported it (Ray Train returns the last checkpoint's metrics, and the
    phase-end checkpoint is written before its evaluation)."""
    final = storage.read_json(storage.join(run_dir, "eval.json"), default={})
    return {k: float(v) for k, v in final.items()}


def _read_run_state(run_dir: str) -> dict[str, Any]:
    """The launcher's own record of the run (``RUN_STATE_FILE``): its MLflow run, attempts, and once it finished,
    its final metrics. One small read per launch (on S3 a HEAD and a GET)."""
    return storage.read_json(storage.join(run_dir, RUN_STATE_FILE), default={})


def _write_run_state(run_dir: str, state: dict[str, Any]) -> None:
    storage.write_json(storage.join(run_dir, RUN_STATE_FILE), state)


def init_ray(cfg: Config) -> None:
    """Connect to $RAY_ADDRESS (or an already initialised Ray); else start a local one sized for the workers.

    On a 2-core box, workers with a whole CPU each starve Ray Data, so a local Ray gets enough logical CPUs for
    the workers *and* the data pipeline.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # No runtime_env here: inside `ray job submit` the job's own runtime env applies, and Ray refuses a second
        # one from the driver. Workers set their torch threads from scaling.cpus_per_worker themselves.
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    env = {"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}}
    needed = cfg.scaling.max_workers * cfg.scaling.cpus_per_worker + 2
    # The dashboard stays on (Ray's default): Ray Train's placement-group cleaner and the state API need it; without
    # it a worker group killed mid-run (a sweep trial stopped early) keeps its CPUs reserved forever.
    # address="local": a new Ray even when /tmp/ray/ray_current_cluster names another (`ray start`, a test cluster).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), runtime_env=env)


def _use_gpu(cfg: Config) -> bool:
    import ray

    setting = str(cfg.scaling.use_gpu).lower()
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return setting == "true"


def build_datasets(cfg: Config, tokenizer_json: str, run_dir: str, missing_actor: Any = None) -> dict[str, Any]:
    """One dataset factory per phase, for ``TorchTrainer(datasets=...)``.

    Ray Train calls a callable dataset again at every start of the worker group (a restart, an elastic resize, a
    rerun of the same command), so each factory rebuilds its phase's stream from the data position stored in the
    checkpoint that Ray Train is about to restore: a restart continues with the rows that follow, none trained
    twice. The footers are read once here (in parallel) and travel with the factories.
    """
    from reclip_ray.data.shards import list_parquet_files, read_footers
    from reclip_ray.schedule import Schedule

    shards = read_footers(list_parquet_files(cfg.data.train), cfg.data.image_column)
    rows = sum(s.rows for s in shards)
    present = rows - sum(s.absent for s in shards)
    if present <= 0:
        raise DataError(f"{cfg.data.train}: the shards hold no rows" if rows == 0 else
                        f"{cfg.data.train}: all {rows} rows are absent (no image bytes: failed downloads?)")
    usable = max(1.0, present * (1.0 - cfg.data.max_bad_fraction))
    concurrency = decode_concurrency(cfg)
    datasets = {}
    for plan in Schedule.from_config(cfg).phases:
        datasets[phase_dataset_name(plan.index)] = PhaseDatasetFactory(
            cfg, plan.index, shards, passes=max(1, math.ceil(phase_rows_needed(cfg, plan) / usable)),
            tokenizer_json=tokenizer_json, run_dir=run_dir, concurrency=concurrency, missing_actor=missing_actor)
    return datasets


def phase_rows_needed(cfg: Config, plan: Any) -> int:
    """Good rows a phase's stream must hold so that no rank runs out: ``samples + 2 (N - 1) + slack``, N =
    ``scaling.max_workers`` (the worst case of any worker count up to it).

    ``streaming_split(equal=True)`` gives each of N ranks ``floor(rows / N)`` rows (it drops fewer than N), and
    ``worker.step_split`` rotates the rows that do not divide, so from any step on a rank trains at most
    ``ceil(samples / N)`` of the phase's remaining rows: ``N ceil(samples / N) + N - 1 <= samples + 2 (N - 1)`` rows
    are enough. A restart rebuilds the stream without the rows already trained (``feed.DataPosition``), so the
    bound holds from every checkpoint on. The slack, one shuffle buffer and four decode batches per worker, absorbs
    bad rows and unit markers falling unevenly on the ranks' shares (the bad-row budget, ``max_bad_fraction``,
    is taken out of every pass by the caller).
    """

    workers = cfg.scaling.max_workers
    local = -(-plan.batch_size // cfg.scaling.min_workers)  # the largest share, which sizes the largest buffer
    slack = workers * (shuffle_buffer_rows(cfg, local) + 4 * cfg.data.decode_batch_size)
    return plan.samples + 2 * (workers - 1) + slack


class PhaseDatasetFactory:
    """Called by Ray Train (in its controller) at every worker-group start: the phase's dataset from where the
    checkpoint about to be restored left it."""

    def __init__(self, cfg: Config, phase: int, shards: list, *, passes: int, tokenizer_json: str, run_dir: str,
                 concurrency: int, missing_actor: Any = None) -> None:
        from reclip_ray.data.copies import choose_sources
        from reclip_ray.data.stream import PhaseStream

        self.cfg, self.phase, self.run_dir = cfg, phase, run_dir
        self.plan = cfg.phases[phase]
        # The cheapest source per shard: a shrunk copy that covers the phase's image size, else the full image.
        self.sources = choose_sources(shards, self.plan.image_size, train=True, image_column=cfg.data.image_column,
                                      use_copies=cfg.data.use_copies)
        self.stream = PhaseStream(shards, seed=phase_seed(cfg, phase), passes=passes,
                                  group_shards=cfg.data.group_shards, chunk_rows=cfg.data.chunk_rows,
                                  shuffle=cfg.data.shuffle == "files", sources=self.sources.columns)
        self.tokenizer_json = tokenizer_json
        self.concurrency = concurrency
        self.missing_actor = missing_actor

    def __call__(self) -> Any:
        from reclip_ray.data.feed import DataPosition
        from reclip_ray.data.pipeline import phase_dataset
        from reclip_ray.data.schema import ColumnMap

        raise_if_fatal(self.run_dir)
        checkpoint, state = latest_checkpoint_state(self.run_dir)
        position = DataPosition.from_dict(state.get("data"))
        if position.phase != self.phase or state.get("phase_done"):
            position = DataPosition(phase=self.phase)
        record_data_start(self.run_dir, self.phase, checkpoint, position, sources=self.sources.as_dict())
        return phase_dataset(
            self.stream, ColumnMap.from_config(self.cfg.data), image_size=self.plan.image_size,
            text_length=self.plan.text_length, tokenizer_json=self.tokenizer_json, train=True,
            frontier=position.frontier, units=position.units, done=position.done,
            decode_batch_size=self.cfg.data.decode_batch_size,
            missing=self.cfg.data.missing_shards, missing_actor=self.missing_actor, concurrency=self.concurrency,
            on_device=self.cfg.data.decode_device == "cuda",
            keep_keys=self.cfg.fault.record_rows)




def latest_checkpoint_state(run_dir: str) -> tuple[str, dict[str, Any]]:
    """(name, meta.json) of the checkpoint Ray Train restores next: the latest registered one; ("", {}) if none.

    Two small reads (Ray Train's snapshot, the checkpoint's meta.json; on S3 a HEAD and a GET each) per call: once
    per phase at each worker-group start.
    """
    from reclip_ray.train.checkpoint import META_FILE

    snapshot = storage.read_json(storage.join(run_dir, CHECKPOINT_SNAPSHOT), default={})
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if not latest:
        return "", {}
    return latest, json.loads(storage.read_text(storage.join(run_dir, latest, META_FILE)))


def raise_if_fatal(run_dir: str) -> None:
    """End the run at a worker-group start when the last group died of a deterministic error (see the worker)."""

    fatal = storage.read_json(storage.join(run_dir, FATAL_FILE))
    if fatal is not None:
        raise DataError(fatal["message"])


def record_data_start(run_dir: str, phase: int, checkpoint: str, position: Any, sources: dict | None = None) -> None:
    """Note which checkpoint a phase's stream was rebuilt from, so the worker can check it restored the same one,
    and which image column each shard is read from (the worker logs it to MLflow). One small write per phase per
    worker-group start (on S3, pyarrow's 3-request multipart upload)."""
    storage.write_json(storage.join(run_dir, DATA_START_DIR, f"phase{phase}.json"),
                       {"checkpoint": checkpoint, "frontier": position.frontier, "done": len(position.done),
                        "sources": sources or {}}, indent=None)


def decode_concurrency(cfg: Config) -> int:
    """Read+decode tasks in flight per phase: ``data.read_parallelism``, or by default one per CPU in the cluster
    (at least 4). Decoding is single-threaded PIL work; a fixed small cap starves the GPUs of a big node."""
    import ray

    from reclip_ray.data.pipeline import MAX_TASKS

    if cfg.data.read_parallelism > 0:
        return cfg.data.read_parallelism
    return max(MAX_TASKS, int(ray.cluster_resources().get("CPU", 0)))


def run_training(
    cfg: Config,
    *,
    callbacks: list[Any] | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    console: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the job described by ``cfg``; returns the final metrics. Ends the MLflow run in every case.

    ``callbacks`` go to Ray Train's RunConfig (a sweep passes Tune's report callback); ``parent_run_id`` nests the
    MLflow run under a sweep's parent run. ``console`` (the CLI) draws the run's progress in this process and sends
    Ray's own output to ``RUN_DIR/ray.log`` (unless ``verbose``).
    """
    import contextlib
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from reclip_ray import tracking
    from reclip_ray.data.pipeline import get_or_create_missing_shards
    from reclip_ray.flops import run_flops
    from reclip_ray.schedule import Schedule
    from reclip_ray.train.worker import train_loop_per_worker

    prep = prepare(cfg)
    cfg = prep.cfg
    run_state = _read_run_state(prep.run_dir)
    finished = run_state.get("finished") or {}
    if finished.get("samples") == Schedule.from_config(cfg).total_samples:
        print(f"[reclip] run '{prep.run_name}' already finished ({finished['samples']} samples); model at "
              f"{prep.run_dir}/model, MLflow run {finished.get('mlflow_run_id')}. Nothing to do.", flush=True)
        return dict(finished)
    flops = run_flops(cfg)
    tags = {
        "reclip.phases": " -> ".join(f"{p.name}:{p.image_size}px/{p.text_length}tok" for p in cfg.phases),
        "reclip.total_train_gflops": f"{flops['total_train_gflops']:.1f}",
        "reclip.run_dir": prep.run_dir,
        **(tags or {}),
    }
    run_id = tracking.start_or_resume_run(
        prep.tracking_uri, prep.experiment, prep.run_name, run_state.get("mlflow_run_id"), cfg, tags=tags,
        parent_run_id=parent_run_id,
    )
    resumed = bool(run_state.get("mlflow_run_id")) and run_state["mlflow_run_id"] == run_id
    _write_run_state(prep.run_dir, {"mlflow_run_id": run_id, "tracking_uri": prep.tracking_uri,
                                    "attempts": run_state.get("attempts", 0) + 1})
    print(f"[reclip] MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {prep.tracking_uri}", flush=True)

    status = "FAILED"
    relay = None  # the workers' MLflow relay (a local store only)
    log_file = None  # Ray's output, when the console takes it off the screen
    try:
        init_ray(cfg)
        board = display = None
        if console:
            from reclip_ray.console import ProgressDisplay, board_reader, get_board, redirect_ray_output

            log_file = None if verbose else redirect_ray_output(prep.run_dir)
            if log_file:
                copied = (f", copied to {storage.join(prep.run_dir, 'ray.log')} at the end"
                          if storage.is_uri(prep.run_dir) else "")
                print(f"[reclip] Ray's own output: {log_file}{copied} (--verbose shows it here)", flush=True)
            board = get_board(prep.run_name, create=True)
            display = ProgressDisplay(board_reader(board))
        use_gpu = _use_gpu(cfg)
        if cfg.data.decode_device == "cuda" and not use_gpu:
            raise ConfigError("'data.decode_device=cuda' needs GPU workers, and this cluster has no GPU "
                              "(set data.decode_device=cpu)")
        tokenizer_json = storage.read_text(prep.tokenizer_path)

        storage.delete_file(storage.join(prep.run_dir, FATAL_FILE))  # a rerun tries again (the user fixed it?)
        missing_actor = get_or_create_missing_shards(f"reclip-missing-shards-{prep.run_name}")
        relay = (tracking.start_relay(f"reclip-tracking-{prep.run_name}")
                 if tracking.is_local_store(prep.tracking_uri) else None)
        datasets = build_datasets(cfg, tokenizer_json, prep.run_dir, missing_actor)
        resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
        if use_gpu:
            resources["GPU"] = cfg.scaling.gpus_per_worker
        workers = (
            cfg.scaling.min_workers
            if cfg.scaling.min_workers == cfg.scaling.max_workers
            else (cfg.scaling.min_workers, cfg.scaling.max_workers)
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.to_dict(),
                "config_yaml": cfg.to_yaml(),
                "tokenizer_json": tokenizer_json,
                "tracking_uri": prep.tracking_uri,
                "mlflow_run_id": run_id,
                "run_dir": prep.run_dir,
                "missing_actor": missing_actor,
                "board": board,
                "tracking_relay": relay,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.train.collective_timeout_s),
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers,
                use_gpu=use_gpu,
                resources_per_worker=resources,
                elastic_resize_monitor_interval_s=cfg.scaling.resize_check_interval_s,
            ),
            run_config=ray.train.RunConfig(
                name=prep.run_name,
                storage_path=cfg.run.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                callbacks=list(callbacks or []),
            ),
            datasets=datasets,
        )
        try:
            with display or contextlib.nullcontext():
                result = trainer.fit()
        except SystemExit:
            # Ray Train's own SIGINT handler (installed by fit() in the main thread) aborts the workers and then
            # exits from inside fit(); to the user that is a Ctrl-C like any other.
            raise KeyboardInterrupt from None
        if result.error is not None:
            raise result.error
        metrics = dict(result.metrics or {})
        expected = Schedule.from_config(cfg).total_samples
        if metrics.get("samples") != expected:
            status = "KILLED"  # aborted from outside (Ctrl-C's graceful abort, a sweep stopping the trial)
            raise ReclipError(f"training stopped at {metrics.get('samples')} of {expected} samples "
                              "without an error (aborted?); rerun the same command to resume")
        status = "FINISHED"
        metrics["mlflow_run_id"] = run_id
        metrics["run_dir"] = prep.run_dir
        # Ray's Checkpoint.path is inside its filesystem (no s3:// scheme): name it under the run folder instead.
        metrics["checkpoint"] = (storage.join(prep.run_dir, storage.name(result.checkpoint.path))
                                 if result.checkpoint else None)
        metrics.update(_final_eval(prep.run_dir))
        done = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}
        _write_run_state(prep.run_dir, {**_read_run_state(prep.run_dir), "finished": done})
        return metrics
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _note_relay(prep.tracking_uri, run_id, relay)
        tracking.end_run(prep.tracking_uri, run_id, status)
        _upload_log(prep.run_dir, log_file)


def _upload_log(run_dir: str, log_file: str | None) -> None:
    """A remote run folder gets the local ray.log at the end of each attempt (console.upload_ray_log)."""
    if log_file is None or not storage.is_uri(run_dir):
        return
    from reclip_ray.console import upload_ray_log

    try:
        upload_ray_log(run_dir, log_file)
    except Exception as exc:  # noqa: BLE001 - a log copy must not mask the run's own outcome
        print(f"[reclip] WARNING: could not copy {log_file} to {run_dir}: {exc}", file=sys.stderr, flush=True)


def _note_relay(tracking_uri: str, run_id: str, relay: Any) -> None:
    """Record on the run where the workers' MLflow calls were written (the relay's node) and how many there were."""
    if relay is None:
        return
    import ray

    from reclip_ray import tracking

    try:
        stats = ray.get(relay.stats.remote(), timeout=30)
        tracking.set_tags(tracking_uri, run_id, {"reclip.tracking_relay_node": stats["node_id"],
                                                 "reclip.tracking_relay_calls": stats["calls"]})
    except Exception as exc:  # noqa: BLE001 - bookkeeping about bookkeeping must not mask the run's own outcome
        print(f"[reclip] WARNING: could not read the MLflow relay's statistics: {exc}", file=sys.stderr, flush=True)


def root_message(exc: BaseException) -> str:
    """The line of a (Ray-wrapped) exception chain that says what went wrong.

    Ray wraps a worker's error several times and appends advice; the useful line is the innermost
    "SomeError: message", and our own errors (written to be read) are preferred and shown without their type.
    """
    import re

    # Breadth-first through causes and the per-rank failures Ray Train keeps (its own message holds only a snippet
    # of each worker's traceback); deepest last.
    chain: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if e in chain:
            continue
        chain.append(e)
        nested = [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None),
                  *(getattr(e, "worker_failures", None) or {}).values()]
        todo += [n for n in nested if isinstance(n, BaseException)]
    pattern = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$")
    ours = ("DataError", "ConfigError", "CheckpointError", "ReclipError")
    candidates: list[tuple[str, str]] = []
    for e in reversed(chain):  # innermost first
        for line in reversed([ln.strip() for ln in str(e).splitlines() if ln.strip()]):
            m = pattern.match(line)
            if m and not line.startswith("ray.exceptions."):
                candidates.append(m.groups())
    for kind, text in candidates:
        if kind in ours:
            return text
    if candidates:
        return f"{candidates[0][0]}: {candidates[0][1]}"
    lines = [ln.strip() for ln in str(chain[-1]).splitlines() if ln.strip()]
    return lines[-1] if lines else type(chain[-1]).__name__


def train_from_cli(config: str | None, overrides: list[str], as_json: bool = False, verbose: bool = False) -> int:
    """Run the job; print the summary table (or, with ``as_json``, the final metrics as JSON) and draw report.png."""
    import time

    from reclip_ray.report import report_after_training, summary_table

    cfg = load_config(config, overrides)
    t0 = time.monotonic()
    try:
        metrics = run_training(cfg, console=True, verbose=verbose)
    except ReclipError:
        raise
    except Exception as exc:  # a worker's error arrives wrapped in Ray's; show the line that says what went wrong
        raise ReclipError(f"training failed: {root_message(exc)}") from None
    wall_s = time.monotonic() - t0
    uri = cfg.tracking.uri  # made absolute by prepare()
    png = report_after_training(metrics["run_dir"], uri, metrics["mlflow_run_id"])  # warns, never raises
    if as_json:
        final = {k: v for k, v in metrics.items()
                 if k.startswith("eval/") and not k.startswith("eval/full/") and ("top1" in k or "r@1" in k)}
        print(json.dumps({"final": final, "run_dir": metrics["run_dir"], "mlflow_run_id": metrics["mlflow_run_id"],
                          "report": png}, indent=2))
        print(f"[reclip] model: {metrics['run_dir']}/model   metrics: mlflow ui --backend-store-uri {uri}",
              file=sys.stderr)
    else:
        print(summary_table(metrics, wall_s=wall_s, run_dir=metrics["run_dir"], mlflow_run_id=metrics["mlflow_run_id"],
                            tracking_uri=uri, full_size=cfg.eval.full_image_size or cfg.phases[-1].image_size,
                            report_png=png), flush=True)
    return 0
