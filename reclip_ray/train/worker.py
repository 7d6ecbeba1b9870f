"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: build the model, optimizer and schedule; restore the last checkpoint if there is one; walk the
phases, each reading its own Ray Data shard at its own image size and text length; log, checkpoint and evaluate at
sample counts. Everything that decides *when* something happens is a function of samples seen and the schedule, never
of iterator exhaustion or of the worker count, so every rank takes the same number of steps and a run resized from
2 workers to 1 follows the same optimisation.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

from reclip_ray import storage
from reclip_ray.config import Config, from_dict
from reclip_ray.run_names import (DATA_START_DIR, FATAL_FILE, FAULT_ENV, full_view, phase_dataset_name, phase_seed,
                                  shuffle_buffer_rows)
from reclip_ray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint



def split_batch(global_batch: int, world_size: int, first: int = 0) -> list[int]:
    """Per-rank batch sizes that add up to the global batch exactly: ranks ``first``, ``first + 1``, ... (wrapping
    around) take the rows that do not divide, one each."""
    base, extra = divmod(global_batch, world_size)
    if base == 0:
        raise ValueError(f"global batch {global_batch} is smaller than the number of workers {world_size}")
    return [base + (1 if (r - first) % world_size < extra else 0) for r in range(world_size)]


def step_split(plan: Any, samples_seen: int, world_size: int) -> list[int]:
    """Every rank's rows in the step of ``plan`` that starts at ``samples_seen``.

    The rows that do not divide go to the next ranks in turn, continuing where the step before left off (step k of
    the phase starts at rank ``k * (batch % world) % world``), so over any run of steps each rank trains within one
    row of ``rows / world``. That is what ``streaming_split(equal=True)`` gives each rank of the phase's stream;
    always favouring the first ranks would make rank 0 need ``steps x (1 - (batch % world) / world)`` rows more than
    its share. A function of the sample count, so a restart continues the rotation where the checkpoint left it.
    """
    k = (samples_seen - plan.start_sample) // plan.batch_size
    return split_batch(plan.batch_at(samples_seen), world_size, first=k * (plan.batch_size % world_size) % world_size)


def _maybe_inject_fault(cfg: Config, state: TrainState, prev_samples: int, rank: int, marker: str) -> None:
    """Testing only: make one rank raise once when the run crosses ``fault.fail_at_samples``.

    "Once" is remembered by a marker file in the run folder, so the restarted run does not fail again at the same
    sample count (a rerun with another ``fail_at_samples`` fails once more).
    """
    at = int(os.environ.get(FAULT_ENV, "0") or 0) or cfg.fault.fail_at_samples
    if not at or rank != cfg.fault.fail_rank or not (prev_samples < at <= state.samples):
        return
    seen = storage.read_json(marker)
    if seen is not None and seen.get("at", at) == at:
        return
    storage.write_json(marker, {"at": at, "samples": state.samples, "time": time.time()})
    raise RuntimeError(f"fault injected at {state.samples} samples on rank {rank} (fault.fail_at_samples={at})")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Restore, then run each phase not finished yet, then export. Every rank takes the same steps.

    A data, config or checkpoint error is deterministic: retrying it would fail again at the same place after
    another restore. It is written to ``FATAL_FILE`` in the run folder, where the next worker-group start (the
    launcher's dataset factory) finds it and ends the run at once instead of retrying ``run.max_failures`` times.
    """
    from reclip_ray.errors import ReclipError

    try:
        _train(loop_config)
    except ReclipError as exc:
        _write_fatal(loop_config["run_dir"], exc)
        raise


def _write_fatal(run_dir: str, exc: BaseException) -> None:
    """Every rank that hit it writes the same small file (3 requests on S3: pyarrow uploads in parts); the last
    one wins. A failed write is printed, never raised: it must not hide the error it was recording."""
    path = storage.join(run_dir, FATAL_FILE)
    try:
        storage.write_json(path, {"type": type(exc).__name__, "message": str(exc)})
    except Exception as write_error:  # noqa: BLE001 - then Ray Train retries the run, as without the file
        print(f"[reclip] WARNING: could not write {path}: {write_error}", flush=True)


def _train(loop_config: dict[str, Any]) -> None:
    w = _Worker(loop_config)
    for plan in w.schedule.phases:
        if w.state.phase > plan.index or (w.state.phase == plan.index and w.state.phase_done):
            continue  # finished before the restart
        _run_phase(w, plan)
        _end_phase(w, plan)
    if w.rank == 0:
        _export(w.cfg, w.model, w.tokenizer, w.run_dir, w.tracking_uri, w.run_id, w.state, loop_config["config_yaml"])
    _final_report(w)


def _final_report(w: _Worker) -> None:
    """The run's last report: the final model's evaluation (the last phase end's), or why there is none."""
    n = len(w.schedule.phases)
    w.report({"done": 1, "loss": w.final_loss, **_eval_report(w, w.state.eval, w.eval_error), "eval_round": n,
              "eval_rounds_planned": n}, save=False)


class _Worker:
    """What every step of a rank needs: config, model, optimizer, schedule, run position, and Ray's context."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        from reclip_ray import tracking
        from reclip_ray.data.tokenizer import CaptionTokenizer
        from reclip_ray.model import build_model
        from reclip_ray.schedule import Schedule, build_optimizer
        from reclip_ray.train.step import autocast_dtype_for, compile_model, local_loss_enabled

        self.loop_config = loop_config
        self.cfg = cfg = from_dict(loop_config["config"])
        # A local MLflow store is a file on the driver's node: send the MLflow calls there (tracking.TrackingRelay).
        tracking.use_relay(loop_config.get("tracking_relay"))
        self.tokenizer = CaptionTokenizer.from_json(loop_config["tokenizer_json"])
        self.tracking_uri: str = loop_config["tracking_uri"]
        self.run_dir: str = loop_config["run_dir"]  # a local folder or a URI: never a Path (storage.py)
        self.missing_actor = loop_config.get("missing_actor")
        self.board = loop_config.get("board")  # the driver's progress display (None: print, as in a sweep trial)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(round(cfg.scaling.cpus_per_worker))))
        self.autocast = autocast_dtype_for(cfg.train.precision, self.device)
        self.local_loss = local_loss_enabled(cfg.train.local_loss, self.world)

        # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, tokenizer=self.tokenizer).to(self.device)
        if cfg.train.grad_checkpointing or cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            compile_model(self.model)  # in place: checkpoints and DDP see the same module and parameter names
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = Schedule.from_config(cfg)
        self.state = TrainState(mlflow_run_id=loop_config["mlflow_run_id"])
        checkpoint = ray.train.get_checkpoint()
        self.restored_from = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else ""
        if checkpoint is not None:
            with checkpoint.as_directory() as ckpt_dir:
                self.state = load_checkpoint(ckpt_dir, self.model, self.optimizer, map_location=self.device)
            self.state.mlflow_run_id = loop_config["mlflow_run_id"]
        elif cfg.model.init_from:  # only a fresh start: a resumed run's checkpoint wins
            from reclip_ray.init_weights import init_from

            line = init_from(self.model, cfg.model.init_from)
            if self.rank == 0:
                self.say(line)
                # One point per application: a resumed run must add none (tests/test_reliability.py checks).
                tracking.log_metrics(self.tracking_uri, self.state.mlflow_run_id, {"init_from_applied": 1}, step=0)
                tracking.set_tags(self.tracking_uri, self.state.mlflow_run_id, {"reclip.init_from": line[:5000]})
        self.run_id = self.state.mlflow_run_id
        # Every start of a worker group after the first is a restart, with or without a checkpoint to resume from
        # (MLflow remembers the count, so a restart before the first checkpoint still shows).
        if self.rank == 0:
            previous = tracking.latest_metric(self.tracking_uri, self.run_id, "restarts")
            self.state.restarts = max(self.state.restarts, -1 if previous is None else int(previous)) + (
                0 if previous is None and checkpoint is None else 1)
        torch.manual_seed(cfg.train.seed + 1000 * self.state.restarts + self.rank)
        self.ddp_model = (ray.train.torch.prepare_model(self.model, parallel_strategy_kwargs={
            "find_unused_parameters": False}) if self.world > 1 else self.model)
        self.already_logged = tracking.last_logged_step(self.tracking_uri, self.run_id) if self.rank == 0 else -1
        if self.rank == 0:
            tracking.log_metrics(self.tracking_uri, self.run_id, {"restarts": self.state.restarts}, step=self.state.step)
            tracking.set_tags(self.tracking_uri, self.run_id,
                              {"reclip.rank0_node": ray.get_runtime_context().get_node_id()})
            self.say(f"{self.world} worker{'s' if self.world > 1 else ''} on {self.device.type}: "
                     + (f"resumed at {self.state.samples:,} samples (step {self.state.step}, restart "
                        f"{self.state.restarts})" if checkpoint else "starting fresh"))
        self.final_loss = float("nan")
        self.fault_marker = storage.join(self.run_dir, ".fault_injected")
        self.decode_failed = 0  # data.decode_device=cuda: rows that trained as black images (_images)
        self.gflops_reported = self.state.gflops  # compute milestones (eval.at_gflops) up to here are behind us
        # Why the last phase end has no evaluation (None: it has one); _end_phase sets it, _final_report reads it.
        self.eval_error: str | None = "the final model was not evaluated in this attempt (it restarted after the " \
                                      "last phase's checkpoint)"

    def say(self, text: str) -> None:
        """A line for the person watching: through the driver's display, else printed (rank 0 only)."""
        line = f"[reclip] {text}"
        print(line, flush=True)  # the run's log
        if self.board is not None:
            self.board.event.remote(line)

    def report(self, metrics: dict[str, Any], save: bool) -> None:
        """Barrier on every rank; rank 0 attaches the checkpoint. Same call count on every rank by construction."""
        import ray.train

        state = self.state
        metrics = {**metrics, "samples": state.samples, "step": state.step, "phase": state.phase,
                   "workers": self.world, "gflops_total": state.gflops, "mlflow_run_id": state.mlflow_run_id}
        if save and self.rank == 0:
            with tempfile.TemporaryDirectory(prefix="reclip-ckpt-") as tmp:
                save_checkpoint(tmp, self.model, self.optimizer, state, self.loop_config["config_yaml"])
                name = f"checkpoint_s{state.samples:012d}_p{state.phase}{'e' if state.phase_done else ''}"
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint=None)


def _open_feed(w: _Worker, plan: Any, local_batch: int) -> Any:
    """This rank's feed of the phase: its shard of the stream (which starts where the checkpoint left off)."""
    import ray.train

    from reclip_ray.data.feed import DataPosition, PhaseFeed

    position = DataPosition.from_dict(w.state.data)
    if position.phase != plan.index:
        position = DataPosition(phase=plan.index)
    _check_data_start(w, plan.index)
    shard = ray.train.get_dataset_shard(phase_dataset_name(plan.index))
    blocks = iter(shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
    return PhaseFeed(blocks, buffer_rows=shuffle_buffer_rows(w.cfg, local_batch),
                     seed=phase_seed(w.cfg, plan.index) * 31 + 1000 * w.state.restarts + w.rank, position=position)


def _check_data_start(w: _Worker, phase: int) -> None:
    """The phase's stream was rebuilt (by the launcher's dataset factory) from the checkpoint this worker restored;
    a mismatch would silently train rows twice or skip them, so it fails loudly instead."""

    start = storage.read_json(storage.join(w.run_dir, DATA_START_DIR, f"phase{phase}.json"))
    if start is None:
        return
    used = start.get("checkpoint", "")
    if used != w.restored_from:
        raise RuntimeError(f"phase {phase}: the data stream was rebuilt from checkpoint {used or 'none'!r} but this "
                           f"worker restored {w.restored_from or 'none'!r}")
    sources = start.get("sources") or {}
    if w.rank == 0 and sources.get("summary"):
        from reclip_ray import tracking

        name = w.cfg.phases[phase].name
        w.say(f"phase {phase} '{name}' reads {sources['summary']}")
        tracking.set_tags(w.tracking_uri, w.run_id, {f"reclip.data_source.{name}": sources["summary"]})


def _run_phase(w: _Worker, plan: Any) -> None:
    """Train ``plan`` from the current sample count to its end: the step loop, logging and periodic checkpoints."""
    from reclip_ray.flops import phase_train_flops_per_sample
    from reclip_ray.model import set_patch_dropout
    from reclip_ray.train.step import train_step

    cfg, state, rank, world = w.cfg, w.state, w.rank, w.world
    if state.phase != plan.index:
        state.phase, state.phase_done, state.data = plan.index, False, {}
    # With the global batch's logits, as run_flops / plan count them (flops.py: the same for any worker count).
    gflops_per_sample = phase_train_flops_per_sample(cfg, plan.index) / 1e9  # with the phase's patch dropout
    set_patch_dropout(w.model, cfg.phases[plan.index].patch_dropout)
    local = -(-plan.batch_size // world)  # the larger share of a full step
    w.feed = feed = _open_feed(w, plan, local)
    if rank == 0:
        shares = f"{plan.batch_size // world}-{local}" if plan.batch_size % world else f"{local}"
        w.say(f"phase {plan.index} '{plan.name}': {plan.image_size} px, {plan.text_length} tokens, samples "
              f"{state.samples:,}..{plan.end_sample:,}, global batch {plan.batch_size} ({shares} per "
              f"worker{_micro_note(cfg.train.micro_batch_size, local)}), {gflops_per_sample:.3f} train "
              f"GFLOPs/sample")
    rows_log = _RowLog(w) if cfg.fault.record_rows else None
    window = _Window()
    every = cfg.checkpoint.every_samples
    while state.samples < plan.end_sample:
        # The last step of a phase may be short (or a full step plus a remainder): it trains exactly what it counts.
        sizes = step_split(plan, state.samples, world)
        t0 = time.perf_counter()
        batch = feed.take(sizes[rank])
        if batch is None:
            raise RuntimeError(f"phase '{plan.name}': rank {rank} ran out of data at {state.samples} samples "
                               f"(phase ends at {plan.end_sample}); too many bad or absent rows?")
        images = _images(w, batch, plan.image_size)
        window.data_s += time.perf_counter() - t0
        lr = w.schedule.lr_at(state.samples)
        last = train_step(w.ddp_model, w.optimizer, images,
                          torch.from_numpy(batch["tokens"]), lr=lr, grad_clip=cfg.optim.grad_clip,
                          autocast_dtype=w.autocast, local_batch_sizes=sizes, local_loss=w.local_loss,
                          micro_batch=cfg.train.micro_batch_size)
        prev = state.samples
        state.samples += sum(sizes)
        state.step += 1
        state.gflops += gflops_per_sample * (state.samples - prev)
        window.steps += 1
        window.samples += sum(sizes)
        w.final_loss = last["loss"]
        if rows_log is not None:
            rows_log.write(state.step, plan.index, batch)
        _maybe_inject_fault(cfg, state, prev, rank, w.fault_marker)
        if cfg.fault.step_delay_s:
            time.sleep(cfg.fault.step_delay_s)
        if state.step % cfg.train.log_every_steps == 0 or state.samples >= plan.end_sample:
            _log_window(w, plan, window, last, lr, sizes)
            window = _Window()
        if every and state.samples < plan.end_sample and state.samples // every > prev // every:
            _settle_data(w)
            w.report({"loss": last["loss"]}, save=True)
        if cfg.eval.at_gflops:
            _compute_milestone(w, plan, last)


def _compute_milestone(w: _Worker, plan: Any, last: dict[str, float]) -> None:
    """Sweeps (``eval.at_gflops`` = ASHA's rungs): at the first step past a compute milestone, evaluate at full
    resolution (every rank, its share of the rows) and report, so that Tune's ASHA compares trials at equal
    training GFLOPs (``sweep.asha_axis``) and on one task, the sweep's final metric (``sweep.asha_metric``), instead
    of at phase ends, which fall at very different compute for a RECLIP schedule and a full-resolution baseline.
    Every rank decides alike: the GFLOPs follow from the samples seen."""
    from reclip_ray import tracking
    from reclip_ray.flops import milestones_crossed

    crossed = milestones_crossed(w.cfg.eval.at_gflops, w.gflops_reported, w.state.gflops)
    if not crossed:
        return
    w.gflops_reported = w.state.gflops
    metrics: dict[str, float] = {}
    error = None if w.cfg.data.eval else "no evaluation: data.eval is empty"
    if error is None:
        try:
            metrics = _evaluate_phase(w.cfg, w.model, w.tokenizer, plan, w.schedule, w.device, w.rank, w.world,
                                      own=False)
        except Exception as exc:  # noqa: BLE001 - as at a phase end: logged, training goes on
            error = f"evaluation at {crossed[-1]:,.0f} GFLOPs failed: {type(exc).__name__}: {exc}"
            if w.rank == 0:
                w.say(f"WARNING: {error}")
                tag = f"reclip.eval_error.gflops_{crossed[-1]:.0f}"
                tracking.set_tags(w.tracking_uri, w.run_id, {tag: error[:5000]})
    if w.rank == 0 and metrics:
        tracking.log_metrics(w.tracking_uri, w.run_id, metrics, step=w.state.step)
    w.report({"loss": last["loss"], **_eval_report(w, metrics, error), "compute_milestone": crossed[-1],
              "compute_round": sorted(w.cfg.eval.at_gflops).index(crossed[-1]) + 1,
              "eval_round": plan.index, "eval_rounds_planned": len(w.schedule.phases)}, save=False)


def _images(w: _Worker, batch: dict[str, Any], size: int) -> torch.Tensor:
    """The batch's uint8 NHWC images; with ``data.decode_device=cuda`` the stream sends JPEG bytes + crop boxes
    and they are decoded here, on the training device (``data/device_decode.py``)."""
    if "jpeg" not in batch:
        return torch.from_numpy(batch["image"])
    from reclip_ray import tracking
    from reclip_ray.data.device_decode import decode_on_device

    images, stats = decode_on_device(batch["jpeg"], batch["box"], size, w.device)
    if stats["failed"]:  # rare: a JPEG neither nvJPEG nor PIL could decode trained as a black image
        w.decode_failed += stats["failed"]
        w.say(f"WARNING: {stats['failed']} image(s) failed to decode on rank {w.rank} and trained as black images "
              f"({w.decode_failed} so far)")
        if w.rank == 0:
            tracking.log_metrics(w.tracking_uri, w.run_id, {"data_rows_decode_failed": w.decode_failed},
                                 step=w.state.step)
    return images


def _micro_note(micro: int, local: int) -> str:
    """Say when a worker accumulates: its share of the global batch is over ``train.micro_batch_size``."""
    return f" in {-(-local // micro)} micro-batches of <= {micro}" if 0 < micro < local else ""


class _Window:
    """Counters of one logging window."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.data_s = 0.0
        self.steps = 0
        self.samples = 0


def _log_window(w: _Worker, plan: Any, window: _Window, last: dict[str, float], lr: float, sizes: list[int]) -> None:
    """Check the bad-row budget on every rank (one small all-reduce), then rank 0 logs the window."""
    from reclip_ray import tracking

    state = w.state
    # Rows read so far, each once: settled at checkpoints (trained or dropped as bad), trained or dropped since, and
    # waiting in the feeds' buffers (``_settle_data``).
    seen, bad = _sum_over_ranks(w, [w.feed.recorded + w.feed.available, w.feed.bad])
    seen += state.rows_seen
    bad += state.rows_bad
    _check_bad_rows(w, seen, bad)
    if w.rank != 0:
        return
    elapsed = max(time.perf_counter() - window.t0, 1e-9)
    sps = window.samples / elapsed
    remaining = sum(p.end_sample - max(p.start_sample, state.samples) for p in w.schedule.phases
                    if p.end_sample > state.samples)
    metrics = {
        "loss": last["loss"], "lr": lr, "logit_scale": last["logit_scale"], "samples_per_s": sps,
        "data_wait_fraction": window.data_s / elapsed, "phase": plan.index, "image_size": plan.image_size,
        "text_length": plan.text_length, "samples": state.samples, "gflops_total": state.gflops,
        "workers": w.world, "local_batch": sizes[w.rank], "worker_peak_rss_mib": _peak_rss_mib(),
        "data_rows_seen": seen, "data_rows_bad": bad, "data_rows_absent": state.rows_absent,
    }
    if w.missing_actor is not None:
        import ray

        metrics["data_shards_missing"] = len(ray.get(w.missing_actor.missing.remote()))
    if state.step > w.already_logged:
        tracking.log_metrics(w.tracking_uri, w.run_id, metrics, step=state.step)
    if w.board is not None:  # the driver draws it
        w.board.update.remote({**metrics, "phase_name": plan.name, "step": state.step,
                               "total_steps": w.schedule.total_steps, "total_samples": w.schedule.total_samples,
                               "eta_s": remaining / max(sps, 1e-9)})
        return
    print(f"[reclip] {plan.name} {plan.image_size}px step {state.step}/{w.schedule.total_steps} "
          f"samples {state.samples}/{w.schedule.total_samples} loss {last['loss']:.4f} lr {lr:.2e} "
          f"scale {last['logit_scale']:.1f} {sps:.0f} samples/s data-wait {metrics['data_wait_fraction']:.0%} "
          f"GFLOPs {state.gflops:.1f} ETA {remaining / max(sps, 1e-9):.0f}s", flush=True)


def _check_bad_rows(w: _Worker, seen: int, bad: int) -> None:
    """``data.max_bad_fraction`` over the whole run so far; every rank decides alike (same totals), and the error
    names a bad row that one of the ranks saw."""
    from reclip_ray.data.local import check_bad_fraction

    if seen <= 0 or bad / seen <= w.cfg.data.max_bad_fraction:
        return
    examples = _gather(w, w.feed.example)
    check_bad_fraction(seen, bad, w.cfg.data.max_bad_fraction, next((e for e in examples if e), None))


def _settle_data(w: _Worker) -> None:
    """Agree on the data position (all ranks) and fold the settled row counts into the run state. Two all-gathers:
    each rank's counts per unit (which units are done), then its positions in the units that are not (a few per
    unit with rows in flight, however many rows were trained since the last checkpoint).

    ``rows_seen`` counts each row read once, across restarts: a checkpoint settles the rows trained or dropped as
    bad (``PhaseFeed.merge``), never those still in a buffer, which a restart from it reads again; those count
    when trained, or at the phase end (``_end_phase``) if they never are.
    """
    settled = w.feed.merge(_gather(w, w.feed.report()))
    w.feed.agree(_gather(w, w.feed.pending()))
    w.state.rows_seen += settled["seen"]
    w.state.rows_bad += settled["bad"]
    w.state.rows_absent += settled["absent"]
    w.state.data = w.feed.position().to_dict()


def _gather(w: _Worker, obj: Any) -> list[Any]:
    if w.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * w.world
    dist.all_gather_object(out, obj)
    return out


def _sum_over_ranks(w: _Worker, values: list[int]) -> list[int]:
    if w.world == 1:
        return [int(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=w.device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def _end_phase(w: _Worker, plan: Any) -> None:
    """Checkpoint the finished phase first, then evaluate it: an evaluation error is logged, never costs the
    phase's training."""
    from reclip_ray import tracking

    state = w.state
    _settle_data(w)
    state.rows_absent += w.feed.absent_in_flight()  # units the phase never finished: their absent rows count now
    state.rows_seen += _sum_over_ranks(w, [w.feed.available])[0]  # read, never to be read again: seen now
    state.phase_done, state.data = True, {}
    steps = _steps_on_every_rank(state.step, w.world, w.device)
    if w.rank == 0:
        tracking.log_metrics(w.tracking_uri, w.run_id, {"rank_steps_min": min(steps), "rank_steps_max": max(steps),
                                                        "data_rows_seen": state.rows_seen,
                                                        "data_rows_bad": state.rows_bad,
                                                        "data_rows_absent": state.rows_absent}, step=state.step)
    w.report({"loss": w.final_loss}, save=True)
    eval_metrics: dict[str, float] = {}
    error = ("no evaluation: data.eval is empty" if not w.cfg.data.eval else
             None if w.cfg.eval.at_phase_end else "no evaluation: eval.at_phase_end is false")
    if error is None:  # every rank evaluates its share of the rows (evaluate.py)
        try:
            eval_metrics = _evaluate_phase(w.cfg, w.model, w.tokenizer, plan, w.schedule, w.device, w.rank, w.world)
        except Exception as exc:  # noqa: BLE001 - a broken eval set must not throw the phase's training away
            error = f"evaluation after '{plan.name}' failed: {type(exc).__name__}: {exc}"
            if w.rank == 0:  # every rank got the same error (evaluate_dataset raises it on all of them)
                w.say(f"WARNING: {error} (training goes on)")
                tracking.set_tags(w.tracking_uri, w.run_id, {f"reclip.eval_error.{plan.name}": error[:5000]})
                tracking.log_metrics(w.tracking_uri, w.run_id, {"eval_errors": 1}, step=state.step)
        else:
            if w.rank == 0:
                state.eval = eval_metrics
                tracking.log_metrics(w.tracking_uri, w.run_id, eval_metrics, step=state.step)
                w.say(f"eval after '{plan.name}': {_eval_line(eval_metrics)}")
            else:
                eval_metrics = {}  # rank 0 logs and reports them; the other ranks' reports carry none, as before
    w.eval_error = error
    # For Ray Tune (sweeps): the evaluation (or why there is none) and the phases finished so far.
    w.report({"loss": w.final_loss, **_eval_report(w, eval_metrics, error), "eval_round": plan.index + 1,
              "eval_rounds_planned": len(w.schedule.phases)}, save=False)


class _RowLog:
    """Testing only (``fault.record_rows``): the keys each rank trains at each step, one JSON line per step.

    A local file is appended to; an object store has no append, so there the whole file is rewritten each step
    (one upload per step, fine for the tests this exists for).
    """

    def __init__(self, w: _Worker) -> None:
        self.path = storage.join(w.run_dir, "rows", f"rank{w.rank}-start{w.state.restarts}-{os.getpid()}.jsonl")
        self.local = storage.local_path(self.path)
        if self.local is not None:
            os.makedirs(os.path.dirname(self.local), exist_ok=True)
        self.lines: list[str] = []
        self.world = w.world

    def write(self, step: int, phase: int, batch: dict[str, Any]) -> None:
        line = json.dumps({"step": step, "phase": phase, "t": time.time(), "world": self.world,
                           "keys": [str(k) for k in batch["key"]],
                           "passes": [int(p) for p in batch["_pass"]]}) + "\n"
        if self.local is not None:
            with open(self.local, "a") as f:
                f.write(line)
            return
        self.lines.append(line)
        storage.write_text(self.path, "".join(self.lines))


def _eval_report(w: _Worker, metrics: dict[str, float], error: str | None) -> dict[str, Any]:
    """The evaluation part of a report that may reach Tune (a compute milestone, a phase end, the final report).

    The metrics, with the full-resolution ones again under ``eval/full/...`` (one name for a sweep's metric whatever
    each trial's full size is); or, when this evaluation failed or did not run, why (``eval_error``): a sweep then
    reports its metric as NaN for this trial here (``sweep.tune_result``) instead of failing Tune's metric check.
    Only rank 0's report reaches Tune; the other ranks' carry neither.
    """
    if w.rank != 0:
        return {}
    if error is not None:
        return {"eval_error": error}
    return {**metrics, **_full_view(w.cfg, w.schedule, metrics)}


def _full_view(cfg: Config, schedule: Any, eval_metrics: dict[str, float]) -> dict[str, float]:

    return full_view(cfg.eval.full_image_size or schedule.phases[-1].image_size, eval_metrics)


def _peak_rss_mib() -> float:
    """This worker process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _steps_on_every_rank(step: int, world: int, device: torch.device) -> list[int]:
    """Every rank's step count at a phase end; raises if they differ.

    Equal counts are what keeps the collectives (DDP's all-reduce, the loss's all-gather, ``report``) paired up; a
    rank that took one step more would hang the others on a real cluster, so a mismatch fails loudly instead.
    """
    if world == 1:
        return [step]
    import torch.distributed as dist

    steps = torch.tensor([step], dtype=torch.int64, device=device)  # nccl gathers GPU tensors only
    gathered = [torch.zeros_like(steps) for _ in range(world)]
    dist.all_gather(gathered, steps)
    out = [int(t.item()) for t in gathered]
    if len(set(out)) != 1:
        raise RuntimeError(f"ranks disagree on the step count at a phase end: {out}")
    return out


def _eval_line(metrics: dict[str, float]) -> str:
    """``32px: colour 0.61 (chance 0.10), shape 0.18 (0.10), i2t R@1 0.05 | 64px: ...`` for the console."""
    parts = []
    sizes = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.split("/")[1] != "full"},
                   key=lambda s: int(s.rstrip("px")))
    for size in sizes:
        prefix = f"eval/{size}/"
        sets = [k[len(prefix):-len("/top1")] for k in metrics if k.startswith(prefix) and k.endswith("/top1")]
        items = [f"{s} {metrics[prefix + s + '/top1']:.2f} (chance {metrics.get(prefix + s + '/chance_top1', 0):.2f})"
                 for s in sets]
        for key, label in (("image_to_text_r@1", "i2t R@1"), ("text_to_image_r@1", "t2i R@1")):
            if prefix + key in metrics:
                items.append(f"{label} {metrics[prefix + key]:.2f}")
        parts.append(f"{size}: " + ", ".join(items))
    return " | ".join(parts)


def _evaluate_phase(cfg: Config, model: torch.nn.Module, tokenizer: Any, plan: Any, schedule: Any, device: torch.device,
                    rank: int = 0, world: int = 1, own: bool = True) -> dict[str, float]:
    """Zero-shot + retrieval at full resolution and (``own``) at the phase's resolution, if different. With
    ``world`` > 1 every rank calls it and encodes its share of the rows; all return the same metrics."""
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.evaluate import eval_columns, evaluate_dataset

    full = schedule.phases[-1]
    sizes = {plan.image_size: plan.text_length} if own else {}
    sizes.setdefault(cfg.eval.full_image_size or full.image_size, full.text_length)
    out: dict[str, float] = {}
    for image_size, text_length in sizes.items():
        metrics = evaluate_dataset(
            model,
            tokenizer,
            cfg.data.eval,
            image_size=image_size,
            text_length=text_length,
            batch_size=cfg.eval.batch_size,
            columns=eval_columns(cfg.data.eval, ColumnMap.from_config(cfg.data)),
            device=device,
            rank=rank,
            world_size=world,
        )
        out.update({f"eval/{image_size}px/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


def _export(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    run_dir: str,
    tracking_uri: str,
    run_id: str,
    state: TrainState,
    config_yaml: str,
) -> None:
    """Write the inference model and eval.json next to the checkpoints and into MLflow.

    The model folder is replaced whole (storage.upload_dir: a rename locally; on an object store the old objects
    are removed and each file is one PUT). eval.json goes last: the launcher reads it as the run's final metrics.
    """
    from reclip_ray import tracking
    from reclip_ray.export import export_model
    from reclip_ray.schedule import Schedule

    with tempfile.TemporaryDirectory(prefix="reclip-export-") as tmp:
        local = os.path.join(tmp, "model")
        export_model(model, tokenizer, cfg, local)
        final_eval = {**state.eval, **_full_view(cfg, Schedule.from_config(cfg), state.eval)}
        eval_file = os.path.join(tmp, "eval.json")
        with open(eval_file, "w") as f:
            f.write(json.dumps(final_eval, indent=2, sort_keys=True))
        tracking.log_artifacts(tracking_uri, run_id, local, "model")
        tracking.log_artifact(tracking_uri, run_id, eval_file)
        storage.upload_dir(local, storage.join(run_dir, "model"))
        storage.write_json(storage.join(run_dir, "eval.json"), final_eval)
    print(f"[reclip] exported model to {storage.join(run_dir, 'model')}", flush=True)  # the run's log
