"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: build the model, optimizer and schedule; restore the last checkpoint if there is one; walk the
phases, each reading its own Ray Data shard at its own image size and text length; log, checkpoint and evaluate at
sample counts. Everything that decides *when* something happens is a function of samples seen and the schedule, never
of iterator exhaustion or of the worker count, so every rank takes the same number of steps and a run resized from
2 workers to 1 follows the same optimisation.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

import torch

from reclip_ray import storage, tracking
from reclip_ray.config import from_dict, local_loss_enabled, phase_micro_batch
from reclip_ray.errors import ReclipError
from reclip_ray.run_names import stream_layout
from reclip_ray.tracking_relay import (FLUSH_BEFORE_REPORT_S, FLUSH_ON_EXIT_S, flush_before_checkpoint, flush_writes,
                                      use_relay)
from reclip_ray.train.batch_split import step_split
from reclip_ray.train.checkpoint import CheckpointClock, TrainState, load_checkpoint, phase_finished, save_checkpoint
from reclip_ray.train.collectives import steps_on_every_rank, sum_over_ranks
from reclip_ray.train.faults import RowLog, fault_marker, maybe_inject_fault, step_delay_s
from reclip_ray.train.final_export import export_run
from reclip_ray.train.handover import check_data_start, write_fatal
from reclip_ray.train.persist import checkpoint_uploader
from reclip_ray.train.phase_eval import eval_line, eval_report, evaluate_phase, skip_reason
from reclip_ray.train.progress import Window, board_update, console_line, phase_banner
from reclip_ray.train.rank_data import check_bad_rows, open_feed, settle_data
from reclip_ray.train.scratch import checkpoint_folder, downloaded, remove_orphans
from reclip_ray.train.step import (autocast_dtype_for, compile_model, pinned_for, read_step, set_grad_reduce,
                                   train_step)


PHASES_EVALUATED = "phases_evaluated"  # MLflow: the phases whose end evaluation has ended, logged at each phase end


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Restore, then run each phase not finished yet, then export. Every rank takes the same steps. A phase's end
    checkpoint is written before its evaluation, so an attempt restored from it evaluates the phase again where the
    attempt before did not finish that evaluation (``evaluation_lost``); at the run's last checkpoint always: the
    export carries this attempt's evaluation of the final model.

    A data, config or checkpoint error is deterministic: retrying it would fail again at the same place after
    another restore. It is written to ``FATAL_FILE`` in the run folder, where the next worker-group start (the
    dataset factory) finds it and ends the run at once instead of retrying ``run.max_failures`` times.
    """
    try:
        worker = Worker(loop_config)
        for plan in worker.schedule.phases:
            if not worker.finished(plan):
                worker.run_phase(plan)
                worker.end_phase(plan)
            elif worker.evaluation_lost(plan):
                worker.evaluate_end(plan)
        if worker.rank == 0:
            worker.export()
        worker.final_report()
    except ReclipError as exc:
        write_fatal(loop_config["run_dir"], exc)
        raise
    finally:  # on an error, rank 0's last writes (its warnings, the error's tags) before Ray Train restarts the group
        flush_writes(FLUSH_ON_EXIT_S)


class Worker:
    """One rank of the run: its model, optimizer, schedule and run position, and the steps of its loop."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        self.cfg = from_dict(loop_config["config"])
        self.config_yaml: str = loop_config["config_yaml"]
        self._connect(loop_config)
        self._clear_scratch()
        # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(self.cfg.train.seed)
        self._build_model()
        self._restore(loop_config["mlflow_run_id"])
        self._count_restart()
        torch.manual_seed(self.cfg.train.seed + 1000 * self.state.restarts + self.rank)
        self.ddp_model = self._wrap_ddp()
        self._announce()
        self.fault_marker = fault_marker(self.run_dir)
        self.decode_failed = 0  # data.decode_device=cuda: rows that trained as black images (images())
        self.decode_fallback = 0  # data.decode_device=cuda: rows the device refused, decoded by PIL here (images())
        self.gflops_reported = self.state.gflops  # compute milestones (eval.at_gflops) up to here are behind us
        # Why the last phase end has no evaluation (None: it has one); evaluate_end sets it, final_report and export
        # read it.
        self.eval_error: str | None = "the final model was not evaluated"
        self.feed: Any = None  # the phase's PhaseFeed (run_phase)
        self.micro_batch = 0  # the phase's rows per forward/backward (run_phase: config.phase_micro_batch)
        self._read: tuple[Any, dict[str, float]] = (None, {})  # the last step output read, and its floats (read)
        self.checkpoint_clock = CheckpointClock(self.cfg.checkpoint.every_minutes)  # restarted at every checkpoint

    # ------------------------------------------------------------------------------------------ setting up
    def _connect(self, loop_config: dict[str, Any]) -> None:
        """What the driver sent and Ray's context: rank, world size, device, the run's folder and MLflow run."""
        import ray.train
        import ray.train.torch

        from reclip_ray.data.tokenizer import CaptionTokenizer

        cfg = self.cfg
        # A local MLflow store is a file on the driver's node: send the MLflow calls there (tracking_relay). A write that
        # fails, through the relay or to a server, is a warning here (use_relay).
        use_relay(loop_config.get("tracking_relay"), worker=True)
        self.tokenizer = CaptionTokenizer.from_json(loop_config["tokenizer_json"])
        self.tracking_uri: str = loop_config["tracking_uri"]
        self.run_dir: str = loop_config["run_dir"]  # a local folder or a URI: never a Path (storage.py)
        self.missing_actor = loop_config.get("missing_actor")
        self.board = loop_config.get("board")  # the driver's progress display (None: print, as in a sweep trial)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.upload_fn = checkpoint_uploader(self.run_dir, ctx.get_storage())  # None: Ray Train's copy (a local folder)
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(round(cfg.scaling.cpus_per_worker))))
        self.autocast = autocast_dtype_for(cfg.train.precision, self.device)
        self.local_loss = local_loss_enabled(cfg.train.local_loss, self.world)

    def _clear_scratch(self) -> None:
        """Checkpoint folders that a dead process left on this node (``scratch.py``): each is a whole checkpoint."""
        removed = remove_orphans()
        if removed:
            gb = sum(size for _, size in removed) / 1e9
            self.say(f"rank {self.rank}: removed {len(removed)} checkpoint folder(s) ({gb:.2f} GB) that a process "
                     f"that died left in {os.path.dirname(removed[0][0])}")

    def _build_model(self) -> None:
        from reclip_ray.model import build_model
        from reclip_ray.schedule import Schedule, build_optimizer

        cfg = self.cfg
        self.model = build_model(cfg.model, tokenizer=self.tokenizer).to(self.device)
        if cfg.train.grad_checkpointing or cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if cfg.train.compile:
            compile_model(self.model)  # in place: checkpoints and DDP see the same module and parameter names
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.schedule = Schedule.from_config(cfg)

    def _restore(self, mlflow_run_id: str) -> None:
        """The checkpoint Ray Train hands this start, else (a fresh start only) ``model.init_from``'s weights."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        self.state = TrainState(mlflow_run_id=mlflow_run_id)
        self.restored_from = os.path.basename(checkpoint.path.rstrip("/")) if checkpoint is not None else ""
        self.run_id = mlflow_run_id
        if checkpoint is not None:
            with downloaded(checkpoint.path, checkpoint.filesystem) as ckpt_dir:  # not as_directory: scratch.py
                self.state = load_checkpoint(ckpt_dir, self.model, self.optimizer,
                                             source=storage.join(self.run_dir, self.restored_from), config=self.cfg)
            self.state.mlflow_run_id = mlflow_run_id
        elif self.cfg.model.init_from:  # only a fresh start: a resumed run's checkpoint wins
            from reclip_ray.init_weights import init_from_rank0

            line = init_from_rank0(self.model, self.cfg.model.init_from, self.rank)  # the others: DDP's broadcast
            if line is None:
                return
            self.say(line)
            # One point per application: a resumed run must add none (tests/test_reliability.py checks).
            tracking.log_metrics(self.tracking_uri, self.run_id, {"init_from_applied": 1}, step=0)
            tracking.set_tags(self.tracking_uri, self.run_id, {"reclip.init_from": line[:5000]})

    def _count_restart(self) -> None:
        """Every start of a worker group after the first is a restart, with or without a checkpoint to resume from
        (MLflow remembers the count, so a restart before the first checkpoint still shows).

        Rank 0 counts (one MLflow read, not 64) and every rank takes its count: the count seeds each rank's patch
        dropout and feed shuffle, and a rank seeded from the checkpoint's count would repeat the masks and row order
        of the attempt that failed, again at each restart from that checkpoint. One all-reduce per start."""
        counted = 0
        if self.rank == 0:
            previous = tracking.latest_metric(self.tracking_uri, self.run_id, "restarts")
            counted = max(self.state.restarts, -1 if previous is None else int(previous)) + (
                0 if previous is None and not self.restored_from else 1)
        self.state.restarts = sum_over_ranks([counted], self.world, self.device)[0]

    def _wrap_ddp(self) -> torch.nn.Module:
        import ray.train.torch

        if self.world == 1:
            return self.model
        ddp = ray.train.torch.prepare_model(self.model, parallel_strategy_kwargs={"find_unused_parameters": False})
        return set_grad_reduce(ddp, self.cfg.train.grad_reduce)

    def _announce(self) -> None:
        """Rank 0: what MLflow already has of this run (a restart logs no step twice), the restart count, the node."""
        import ray

        self.already_logged = tracking.last_logged_step(self.tracking_uri, self.run_id) if self.rank == 0 else -1
        if self.rank != 0:
            return
        state = self.state
        tracking.log_metrics(self.tracking_uri, self.run_id, {"restarts": state.restarts}, step=state.step)
        node = ray.get_runtime_context().get_node_id()
        tracking.set_tags(self.tracking_uri, self.run_id, {"reclip.rank0_node": node})
        self.say(f"{self.world} worker{'s' if self.world > 1 else ''} on {self.device.type}: "
                 + (f"resumed at {state.samples:,} samples (step {state.step}, restart {state.restarts})"
                    if self.restored_from else "starting fresh"))

    # ------------------------------------------------------------------------------------------ the loop
    @property
    def final_loss(self) -> float:
        """The last step's loss, the restored checkpoint's before this attempt's first step (nan on a fresh start)."""
        return float("nan") if self.state.loss is None else self.state.loss

    def finished(self, plan: Any) -> bool:
        """Whether the run finished ``plan`` before this start."""
        return phase_finished(plan.index, self.state.phase, self.state.phase_done)

    def run_phase(self, plan: Any) -> None:
        """Train ``plan`` from the current sample count to its end: the step loop, logging and periodic checkpoints."""
        from reclip_ray.flops import phase_train_flops_per_sample
        from reclip_ray.model import set_patch_dropout

        cfg, state = self.cfg, self.state
        if state.phase != plan.index:
            state.phase, state.phase_done, state.data = plan.index, False, {}
        # With the global batch's logits, as run_flops / plan count them (flops.py: the same for any worker count).
        gflops_per_sample = phase_train_flops_per_sample(cfg, plan.index) / 1e9  # with the phase's patch dropout
        set_patch_dropout(self.model, cfg.phases[plan.index].patch_dropout)
        if self.device.type == "cuda":  # worker_peak_gpu_mib is per phase: 64 px and 224 px differ several-fold
            torch.cuda.reset_peak_memory_stats(self.device)
        self.feed = self._open_feed(plan)
        self.micro_batch = phase_micro_batch(cfg, plan.index)
        if self.rank == 0:
            self.say(phase_banner(plan, state, self.world, self.micro_batch, gflops_per_sample))
        rows_log = RowLog(self.run_dir, self.rank, state.restarts, self.world) if cfg.fault.record_rows else None
        window = Window()
        every = cfg.checkpoint.every_samples
        while state.samples < plan.end_sample:
            prev = state.samples
            sizes, batch, last, lr = self.step(plan, window, gflops_per_sample)
            if rows_log is not None:
                rows_log.write(state.step, plan.index, batch)
            maybe_inject_fault(cfg, state, prev, self.rank, self.fault_marker)
            if delay := step_delay_s(cfg):
                time.sleep(delay)
            checkpoint_due = False  # checkpoint.every_minutes: decided at log windows, on rank 0's clock
            if state.step % cfg.train.log_every_steps == 0 or state.samples >= plan.end_sample:
                checkpoint_due = self.log_window(plan, window, self.read(last), lr, sizes)
                window = Window()
            crossed = every and state.samples // every > prev // every
            if (crossed or checkpoint_due) and state.samples < plan.end_sample:  # a phase's end checkpoints anyway
                settle_data(self.feed, state, self.world, stream_layout(self.cfg))
                self.report({"loss": self.read(last)["loss"]}, save=True)
            if cfg.eval.at_gflops:
                self.compute_milestone(plan, last)

    def step(self, plan: Any, window: Window, gflops_per_sample: float) -> tuple[list[int], dict, dict, float]:
        """One optimisation step of the phase; returns every rank's rows, this rank's batch, the step's output (on
        the device: ``read`` it where the numbers are needed) and its learning rate. The last step of a phase may be
        short (or a full step plus a remainder): it trains exactly what it counts."""
        state = self.state
        sizes = step_split(plan, state.samples, self.world)
        t0 = time.perf_counter()
        batch = self.feed.take(sizes[self.rank])
        if batch is None:
            raise RuntimeError(f"phase '{plan.name}': rank {self.rank} ran out of data at {state.samples} samples "
                               f"(phase ends at {plan.end_sample}); too many bad or absent rows?")
        if "jpeg" in batch and self.device.type == "cuda":
            # The device decode first waits for the step queued before (device_decode.decode_jpegs): the GPU's time,
            # not the data's; counted in data_s, it made data_wait_fraction ~1 with data.decode_device=cuda.
            wait = time.perf_counter()
            torch.cuda.current_stream(self.device).synchronize()
            t0 += time.perf_counter() - wait
        tokens = torch.from_numpy(batch["tokens"])
        images, tokens = pinned_for(self.device, self.images(batch, plan.image_size), tokens)
        window.data_s += time.perf_counter() - t0
        lr = self.schedule.lr_at(state.samples)
        last = train_step(self.ddp_model, self.optimizer, images, tokens, lr=lr,
                          grad_clip=self.cfg.optim.grad_clip, autocast_dtype=self.autocast, local_batch_sizes=sizes,
                          local_loss=self.local_loss, micro_batch=self.micro_batch)
        state.samples += sum(sizes)
        state.step += 1
        state.gflops += gflops_per_sample * sum(sizes)
        window.steps += 1
        window.samples += sum(sizes)
        return sizes, batch, last, lr

    def read(self, last: dict[str, Any]) -> dict[str, float]:
        """A step's output as floats, which waits for its kernels (so: at log windows, checkpoints and compute
        milestones, not every step; once per step where several fall on it); the loss becomes the run position's
        (``final_loss``, the checkpoint's)."""
        if self._read[0] is not last:
            self._read = (last, read_step(last))
            self.state.loss = self._read[1]["loss"]
        return self._read[1]

    def end_phase(self, plan: Any) -> None:
        """Checkpoint the finished phase first, then evaluate it: an evaluation error is logged, never costs the
        phase's training."""
        state = self.state
        settle_data(self.feed, state, self.world, stream_layout(self.cfg))
        state.rows_absent += self.feed.absent_in_flight()  # units the phase never finished: their absent rows count now
        state.rows_seen += sum_over_ranks([self.feed.available], self.world, self.device)[0]  # read, never to be again
        self.feed.close()
        state.phase_done, state.data = True, {}
        steps = steps_on_every_rank(state.step, self.world, self.device)
        if self.rank == 0:
            tracking.log_metrics(self.tracking_uri, self.run_id, {
                "rank_steps_min": min(steps), "rank_steps_max": max(steps), "data_rows_seen": state.rows_seen,
                "data_rows_bad": state.rows_bad, "data_rows_absent": state.rows_absent}, step=state.step)
        self.report({"loss": self.final_loss}, save=True)
        self.evaluate_end(plan)

    def evaluation_lost(self, plan: Any) -> bool:
        """Whether this attempt, restored from ``plan``'s end checkpoint, must evaluate ``plan`` again: always for the
        last phase (the export needs this attempt's evaluation); for an earlier one when MLflow's ``phases_evaluated``
        (logged as each phase-end evaluation ends, however it ended) says the attempt before did not get that far.
        Every rank follows rank 0's reading."""
        if self.state.phase != plan.index:  # a later checkpoint: this phase end was behind the attempt before
            return False
        if plan is self.schedule.phases[-1]:
            return True
        lost = 0
        if self.rank == 0:
            done = tracking.latest_metric(self.tracking_uri, self.run_id, PHASES_EVALUATED)
            lost = int(done is None or done < plan.index + 1)
        return sum_over_ranks([lost], self.world, self.device)[0] > 0

    def evaluate_end(self, plan: Any) -> None:
        """The phase-end evaluation of the model as the phase's end checkpoint holds it, and its report."""
        metrics, error = self._evaluate_phase_end(plan)
        self.eval_error = error
        if self.rank == 0:  # before the report, which waits for rank 0's writes: a restart reads it (evaluation_lost)
            tracking.log_metrics(self.tracking_uri, self.run_id, {PHASES_EVALUATED: plan.index + 1},
                                 step=self.state.step)
        # For Ray Tune (sweeps): the evaluation (or why there is none) and the phases finished so far.
        self.report({"loss": self.final_loss, **eval_report(self.rank, self.cfg, metrics, error),
                     "eval_round": plan.index + 1, "eval_rounds_planned": len(self.schedule.phases)}, save=False)

    def final_report(self) -> None:
        """The run's last report: the final model's evaluation (the last phase end's), or why there is none."""
        n = len(self.schedule.phases)
        evaluation = eval_report(self.rank, self.cfg, self.state.eval, self.eval_error)
        self.report({"done": 1, "loss": self.final_loss, **evaluation, "eval_round": n, "eval_rounds_planned": n},
                    save=False)

    def export(self) -> None:
        """Rank 0, after the last phase: the inference model and eval.json (``final_export``)."""
        export_run(self.cfg, self.model, self.tokenizer, self.run_dir, self.tracking_uri, self.run_id, self.state,
                   self.eval_error)

    # ------------------------------------------------------------------------------------------ the steps' parts
    def _open_feed(self, plan: Any) -> Any:
        """This rank's feed of the phase, after checking its stream starts from the checkpoint this rank restored."""
        sources = check_data_start(self.run_dir, plan.index, self.restored_from)
        if self.rank == 0 and sources.get("summary"):
            name = self.cfg.phases[plan.index].name
            self.say(f"phase {plan.index} '{name}' reads {sources['summary']}")
            tracking.set_tags(self.tracking_uri, self.run_id, {f"reclip.data_source.{name}": sources["summary"]})
        return open_feed(self.cfg, plan, self.state, self.rank, -(-plan.batch_size // self.world))

    def images(self, batch: dict[str, Any], size: int) -> torch.Tensor:
        """The batch's uint8 NHWC images; with ``data.decode_device=cuda`` the stream sends JPEG bytes + crop boxes
        and they are decoded here, on the training device (``data/device_decode.py``)."""
        if "jpeg" not in batch:
            return torch.from_numpy(batch["image"])
        from reclip_ray.data.device_decode import decode_on_device

        images, stats = decode_on_device(batch["jpeg"], batch["box"], size, self.device)
        if stats["fallback"]:  # JPEGs the device decoder refused, decoded by PIL in this process: slow if many
            if not self.decode_fallback:
                self.say(f"WARNING: the device's JPEG decoder refused {stats['fallback']} of {len(images)} image(s) "
                         f"on rank {self.rank}; they were decoded by PIL in the training process instead (counted "
                         "in data_rows_decode_fallback: if it grows with every batch, set data.decode_device=cpu)")
            self.decode_fallback += stats["fallback"]
        if stats["failed"]:  # rare: a JPEG neither nvJPEG nor PIL could decode trained as a black image
            self.decode_failed += stats["failed"]
            self.say(f"WARNING: {stats['failed']} image(s) failed to decode on rank {self.rank} and trained as black "
                     f"images ({self.decode_failed} so far)")
            if self.rank == 0:
                tracking.log_metrics(self.tracking_uri, self.run_id, {"data_rows_decode_failed": self.decode_failed},
                                     step=self.state.step)
        return images

    def log_window(self, plan: Any, window: Window, last: dict[str, float], lr: float, sizes: list[int]) -> bool:
        """Check the bad-row budget on every rank, then rank 0 logs the window. Returns whether a checkpoint is due
        by rank 0's clock (``checkpoint.every_minutes``): the same answer on every rank, carried by the one small
        all-reduce the bad-row count makes anyway."""
        state, feed = self.state, self.feed
        # Rows read so far, each once: settled at checkpoints (trained or dropped as bad), trained or dropped since, and
        # waiting in the feeds' buffers (``rank_data.settle_data``).
        due = int(self.rank == 0 and self.checkpoint_clock.due())
        seen, bad, due = sum_over_ranks([feed.recorded + feed.available, feed.bad, due], self.world, self.device)
        seen += state.rows_seen
        bad += state.rows_bad
        check_bad_rows(feed, self.world, seen, bad, self.cfg.data.max_bad_fraction)
        if self.rank != 0:
            return due > 0
        metrics = {**window.metrics(plan, state, last, lr, sizes[self.rank], self.world),
                   "data_rows_seen": seen, "data_rows_bad": bad, "data_rows_absent": state.rows_absent}
        if self.decode_fallback:  # rank 0's
            metrics["data_rows_decode_fallback"] = self.decode_fallback
        if self.missing_actor is not None:  # data.missing_shards=skip (with =fail, a missing shard ends the run)
            from reclip_ray.data.pipeline import MISSING_COUNT_TIMEOUT_S, missing_shard_count

            missing = missing_shard_count(self.missing_actor)
            if missing is not None:
                metrics["data_shards_missing"] = missing
            else:
                self.say(f"WARNING: the missing-shards actor did not answer in {MISSING_COUNT_TIMEOUT_S:g} s; "
                         "data_shards_missing not logged this window")
        if state.step > self.already_logged:
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step=state.step)
        if self.board is not None:  # the driver draws it
            self.board.update.remote(board_update(metrics, plan, state, self.schedule))
        else:
            print(console_line(metrics, plan, state, self.schedule), flush=True)
        return due > 0

    def compute_milestone(self, plan: Any, last: dict[str, Any]) -> None:
        """Sweeps (``eval.at_gflops`` = ASHA's rungs): at the first step past a compute milestone, evaluate at full
        resolution (every rank, its share of the rows) and report, so that Tune's ASHA compares trials at equal
        training GFLOPs (``sweep.asha_axis``) and on one task, the sweep's final metric (``sweep.asha_metric``),
        instead of at phase ends, which fall at very different compute for a RECLIP schedule and a full-resolution
        baseline. Every rank decides alike: the GFLOPs follow from the samples seen."""
        from reclip_ray.flops import milestones_crossed

        crossed = milestones_crossed(self.cfg.eval.at_gflops, self.gflops_reported, self.state.gflops)
        if not crossed:
            return
        self.gflops_reported = self.state.gflops
        loss = self.read(last)["loss"]
        metrics: dict[str, float] = {}
        error = skip_reason(self.cfg, at_phase_end=False)
        if error is None:
            metrics, error = self._evaluate(plan, own=False, what=f"evaluation at {crossed[-1]:,.0f} GFLOPs",
                                            tag=f"reclip.eval_error.gflops_{crossed[-1]:.0f}")
        if self.rank == 0 and metrics:
            tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step=self.state.step)
        self.report({"loss": loss, **eval_report(self.rank, self.cfg, metrics, error),
                     "compute_milestone": crossed[-1],
                     "compute_round": sorted(self.cfg.eval.at_gflops).index(crossed[-1]) + 1,
                     "eval_round": plan.index, "eval_rounds_planned": len(self.schedule.phases)}, save=False)

    def _evaluate_phase_end(self, plan: Any) -> tuple[dict[str, float], str | None]:
        """The phase-end evaluation, or why there is none; rank 0 keeps, logs and shows it (the other ranks'
        reports carry none)."""
        error = skip_reason(self.cfg, at_phase_end=True)
        if error is not None:
            return {}, error
        metrics, error = self._evaluate(plan, own=True, what=f"evaluation after '{plan.name}'",
                                        tag=f"reclip.eval_error.{plan.name}", note=" (training goes on)")
        if error is not None:
            if self.rank == 0:
                tracking.log_metrics(self.tracking_uri, self.run_id, {"eval_errors": 1}, step=self.state.step)
            return {}, error
        if self.rank != 0:
            return {}, None
        self.state.eval = metrics
        tracking.log_metrics(self.tracking_uri, self.run_id, metrics, step=self.state.step)
        self.say(f"eval after '{plan.name}': {eval_line(metrics)}")
        return metrics, None

    def _evaluate(self, plan: Any, *, own: bool, what: str, tag: str,
                  note: str = "") -> tuple[dict[str, float], str | None]:
        """Every rank evaluates its share of the rows (evaluate.py): (metrics, None), or ({}, the error). A failed
        evaluation is a warning and a tag on rank 0: a broken eval set must not throw the phase's training away."""
        try:
            return evaluate_phase(self.cfg, self.model, self.tokenizer, plan, self.device, self.rank,
                                  self.world, own=own), None
        except Exception as exc:  # noqa: BLE001 - every rank got the same error (evaluate_dataset raises it on all)
            error = f"{what} failed: {type(exc).__name__}: {exc}"
            if self.rank == 0:
                self.say(f"WARNING: {error}{note}")
                tracking.set_tags(self.tracking_uri, self.run_id, {tag: error[:5000]})
            return {}, error

    # ------------------------------------------------------------------------------------------ talking
    def say(self, text: str) -> None:
        """A line for the person watching: through the driver's display, else printed (rank 0's, and a line only one
        rank can give, such as the checkpoint folders it removed)."""
        line = f"[reclip] {text}"
        print(line, flush=True)  # the run's log
        if self.board is not None:
            self.board.event.remote(line)

    def report(self, metrics: dict[str, Any], save: bool) -> None:
        """Barrier on every rank; rank 0 attaches the checkpoint. Same call count on every rank by construction.

        Rank 0's MLflow writes so far land first (a bounded wait, ``tracking_relay``): an attempt restarted from
        this checkpoint re-logs only the steps after the last one MLflow has, so every step before it must be there."""
        import ray.train

        if self.rank == 0 and (late := flush_before_checkpoint(FLUSH_BEFORE_REPORT_S, f"at step {self.state.step}")):
            self.say(f"WARNING: {late}")
        state = self.state
        metrics = {**metrics, "samples": state.samples, "step": state.step, "phase": state.phase,
                   "workers": self.world, "gflops_total": state.gflops, "mlflow_run_id": state.mlflow_run_id}
        if save and self.rank == 0:
            t0 = time.perf_counter()
            self._report_checkpoint(metrics)
            # What the checkpoint cost the step loop: every other rank waits this long at its next collective
            tracking.log_metrics(self.tracking_uri, self.run_id, {"checkpoint_s": time.perf_counter() - t0},
                                 step=state.step)
        else:
            ray.train.report(metrics, checkpoint=None)
        if save:  # checkpoint.every_minutes counts from the end of the last checkpoint's save
            self.checkpoint_clock.start()

    def _report_checkpoint(self, metrics: dict[str, Any]) -> None:
        """Rank 0: write the checkpoint to a local temp folder and report it. ``checkpoint.upload: sync`` returns once
        Ray Train has copied it to the run folder (every other rank waits at its next collective); ``async`` returns
        at once and a Ray Train thread copies it, then deletes the folder, while training goes on (Ray Train
        registers it, and reports after it, once the copy is done). To object storage the copy is ours
        (``persist.checkpoint_uploader``): each file whole, or the report fails and the checkpoint is not registered."""
        import ray.train

        state = self.state
        name = f"checkpoint_s{state.samples:012d}_p{state.phase}{'e' if state.phase_done else ''}"
        in_thread = self.cfg.checkpoint.upload != "sync"
        upload = {"checkpoint_upload_fn": self.upload_fn} if self.upload_fn is not None else {}
        if in_thread:
            upload.update(checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                          delete_local_checkpoint_after_upload=True)
        tmp = checkpoint_folder()  # removed below, by Ray Train's copy thread, or after this process dies (scratch.py)
        handed = False  # to Ray Train's copy thread, which deletes the folder once it has copied it
        try:
            save_checkpoint(tmp, self.model, self.optimizer, state, self.config_yaml)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name,
                             **upload)
            handed = in_thread
        finally:
            if not handed:  # sync: copied by now; or the write or the report failed
                shutil.rmtree(tmp, ignore_errors=True)
