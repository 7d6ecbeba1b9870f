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
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from reclip_ray.config import Config, from_dict
from reclip_ray.train.checkpoint import TrainState, load_checkpoint, save_checkpoint

FAULT_ENV = "RECLIP_FAIL_AT_SAMPLES"


def split_batch(global_batch: int, world_size: int) -> list[int]:
    """Per-rank batch sizes that add up to the global batch exactly (the first ranks take one extra)."""
    base, extra = divmod(global_batch, world_size)
    if base == 0:
        raise ValueError(f"global batch {global_batch} is smaller than the number of workers {world_size}")
    return [base + (1 if r < extra else 0) for r in range(world_size)]


def phase_dataset_name(index: int) -> str:
    return f"phase{index}"


def _autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    if cfg.train.precision == "fp32":
        return None
    if cfg.train.precision == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


def _maybe_inject_fault(cfg: Config, state: TrainState, prev_samples: int, rank: int, marker: Path) -> None:
    """Testing only: make one rank raise once when the run crosses ``fault.fail_at_samples``.

    "Once" is remembered by a marker file in the run folder, so the restarted run does not fail again.
    """
    at = int(os.environ.get(FAULT_ENV, "0") or 0) or cfg.fault.fail_at_samples
    if not at or rank != cfg.fault.fail_rank or not (prev_samples < at <= state.samples) or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"samples": state.samples, "time": time.time()}))
    raise RuntimeError(f"fault injected at {state.samples} samples on rank {rank} (fault.fail_at_samples={at})")


def _batches(shard: Any, local_batch: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    return iter(
        shard.iter_torch_batches(
            batch_size=local_batch,
            drop_last=True,
            prefetch_batches=2,
            device=device,
            dtypes={"image": torch.uint8, "tokens": torch.int64},
        )
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from reclip_ray import tracking
    from reclip_ray.data.local import check_bad_fraction
    from reclip_ray.data.tokenizer import CaptionTokenizer
    from reclip_ray.flops import sample_forward_flops
    from reclip_ray.model import build_model
    from reclip_ray.schedule import Schedule, build_optimizer
    from reclip_ray.train.step import train_step

    cfg: Config = from_dict(loop_config["config"])
    tokenizer = CaptionTokenizer.from_json(loop_config["tokenizer_json"])
    tracking_uri: str = loop_config["tracking_uri"]
    run_dir = Path(loop_config["run_dir"])
    bad_counter = loop_config.get("bad_counter")

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(round(cfg.scaling.cpus_per_worker))))
    autocast = _autocast_dtype(cfg, device)

    # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, vocab_size=tokenizer.vocab_size).to(device)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, cfg.optim)
    schedule = Schedule.from_config(cfg)
    state = TrainState(mlflow_run_id=loop_config["mlflow_run_id"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir, model, optimizer, map_location=device)
        state.restarts += 1
        state.data_seed += 1  # reshuffle rather than replay the part of the phase already seen
        state.mlflow_run_id = loop_config["mlflow_run_id"]
        torch.manual_seed(cfg.train.seed + 1000 * state.restarts + rank)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False}) if world > 1 else model
    if world == 1:
        model.to(device)

    run_id = state.mlflow_run_id
    already_logged = tracking.last_logged_step(tracking_uri, run_id) if rank == 0 else -1
    if rank == 0:
        tracking.log_metrics(tracking_uri, run_id, {"restarts": state.restarts}, step=state.step)
        print(
            f"[reclip] rank 0 of {world} on {device}: "
            + (f"resumed at {state.samples} samples, step {state.step}" if checkpoint else "starting fresh"),
            flush=True,
        )

    def report(metrics: dict[str, Any], save: bool) -> None:
        """Barrier on every rank; rank 0 attaches the checkpoint. Same call count on every rank by construction."""
        metrics = {**metrics, "samples": state.samples, "step": state.step, "phase": state.phase, "workers": world,
                   "gflops_total": state.gflops, "mlflow_run_id": state.mlflow_run_id}
        if save and rank == 0:
            with tempfile.TemporaryDirectory(prefix="reclip-ckpt-") as tmp:
                save_checkpoint(tmp, model, optimizer, state, loop_config["config_yaml"])
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                    checkpoint_dir_name=f"checkpoint_s{state.samples:012d}_p{state.phase}{'e' if state.phase_done else ''}",
                )
        else:
            ray.train.report(metrics, checkpoint=None)

    fault_marker = run_dir / ".fault_injected"
    final_loss = float("nan")
    every = cfg.checkpoint.every_samples
    for plan in schedule.phases:
        if state.phase > plan.index or (state.phase == plan.index and state.phase_done):
            continue  # finished before the restart
        if state.phase != plan.index:
            state.phase, state.phase_done = plan.index, False
        local_sizes = split_batch(plan.batch_size, world)
        flops = sample_forward_flops(cfg.model, plan.image_size, plan.text_length)
        train_gflops_per_sample = 3 * flops["total"] / 1e9
        shard = ray.train.get_dataset_shard(phase_dataset_name(plan.index))
        batches = _batches(shard, local_sizes[rank], device)
        if rank == 0:
            print(
                f"[reclip] phase {plan.index} '{plan.name}': {plan.image_size}px, {plan.text_length} tokens, "
                f"samples {state.samples}..{plan.end_sample}, global batch {plan.batch_size} "
                f"(per worker {local_sizes}), {train_gflops_per_sample:.3f} train GFLOPs/sample",
                flush=True,
            )
        ddp_model.train()
        t_window, data_window, steps_window = time.perf_counter(), 0.0, 0
        last: dict[str, float] = {}
        while state.samples < plan.end_sample:
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                raise RuntimeError(
                    f"phase '{plan.name}': rank {rank} ran out of data at {state.samples} samples "
                    f"(phase ends at {plan.end_sample}); too many bad rows?"
                )
            data_window += time.perf_counter() - t0
            lr = schedule.lr_at(state.samples)
            last = train_step(
                ddp_model,
                optimizer,
                batch["image"],
                batch["tokens"],
                lr=lr,
                grad_clip=cfg.optim.grad_clip,
                autocast_dtype=autocast,
                local_batch_sizes=local_sizes,
            )
            prev = state.samples
            state.samples = min(state.samples + plan.batch_size, plan.end_sample)
            state.step += 1
            state.gflops += train_gflops_per_sample * (state.samples - prev)
            steps_window += 1
            _maybe_inject_fault(cfg, state, prev, rank, fault_marker)
            if cfg.fault.step_delay_s:
                time.sleep(cfg.fault.step_delay_s)

            if rank == 0 and (state.step % cfg.train.log_every_steps == 0 or state.samples >= plan.end_sample):
                elapsed = time.perf_counter() - t_window
                sps = steps_window * plan.batch_size / max(elapsed, 1e-9)
                remaining = sum(
                    p.end_sample - max(p.start_sample, state.samples) for p in schedule.phases if p.end_sample > state.samples
                )
                metrics = {
                    "loss": last["loss"],
                    "lr": lr,
                    "logit_scale": last["logit_scale"],
                    "samples_per_s": sps,
                    "data_wait_fraction": data_window / max(elapsed, 1e-9),
                    "phase": plan.index,
                    "image_size": plan.image_size,
                    "text_length": plan.text_length,
                    "samples": state.samples,
                    "gflops_total": state.gflops,
                    "workers": world,
                    "local_batch": local_sizes[rank],
                    "worker_peak_rss_mib": _peak_rss_mib(),
                }
                if bad_counter is not None:
                    import ray

                    totals = ray.get(bad_counter.totals.remote())
                    metrics["data_rows_seen"] = totals["seen"]
                    metrics["data_rows_bad"] = totals["bad"]
                    metrics["data_shards_missing"] = len(totals.get("missing", []))
                    examples = totals.get("examples") or []
                    check_bad_fraction(totals["seen"], totals["bad"], cfg.data.max_bad_fraction,
                                       examples[0] if examples else None)
                if state.step > already_logged:
                    tracking.log_metrics(tracking_uri, run_id, metrics, step=state.step)
                print(
                    f"[reclip] {plan.name} {plan.image_size}px step {state.step}/{schedule.total_steps} "
                    f"samples {state.samples}/{schedule.total_samples} loss {last['loss']:.4f} lr {lr:.2e} "
                    f"scale {last['logit_scale']:.1f} {sps:.0f} samples/s data-wait "
                    f"{metrics['data_wait_fraction']:.0%} GFLOPs {state.gflops:.1f} "
                    f"ETA {remaining / max(sps, 1e-9):.0f}s",
                    flush=True,
                )
                t_window, data_window, steps_window = time.perf_counter(), 0.0, 0

            if every and state.samples < plan.end_sample and state.samples // every > prev // every:
                report({"loss": last["loss"]}, save=True)

        # Phase end: evaluate (rank 0, every eval row), checkpoint, report. Other ranks wait in report().
        state.phase_done = True
        steps = _steps_on_every_rank(state.step, world, device)
        if rank == 0:
            tracking.log_metrics(tracking_uri, run_id, {"rank_steps_min": min(steps), "rank_steps_max": max(steps)},
                                 step=state.step)
        eval_metrics: dict[str, float] = {}
        if rank == 0 and cfg.eval.at_phase_end and cfg.data.eval:
            eval_metrics = _evaluate_phase(cfg, model, tokenizer, plan, schedule, device)
            state.eval = eval_metrics
            tracking.log_metrics(tracking_uri, run_id, eval_metrics, step=state.step)
            print(f"[reclip] eval after '{plan.name}': {json.dumps(_short(eval_metrics))}", flush=True)
        # For Ray Tune (sweeps): a monotonic round counter for ASHA and the full-resolution metrics under one name
        # whatever the trial's full size is.
        final_loss = last.get("loss", final_loss)
        report({"loss": final_loss, **eval_metrics, **_full_view(cfg, schedule, eval_metrics),
                "eval_round": plan.index + 1, "eval_rounds_planned": len(schedule.phases)}, save=True)

    if rank == 0:
        _export(cfg, model, tokenizer, run_dir, tracking_uri, run_id, state, loop_config["config_yaml"])
    report({"done": 1, "loss": final_loss, **state.eval, **_full_view(cfg, schedule, state.eval),
            "eval_round": len(schedule.phases),
            "eval_rounds_planned": len(schedule.phases)}, save=False)


def _full_view(cfg: Config, schedule: Any, eval_metrics: dict[str, float]) -> dict[str, float]:
    """The full-resolution metrics again under ``eval/full/...``: one name for a sweep's metric, whatever each
    trial's full size is."""
    full = f"eval/{cfg.eval.full_image_size or schedule.phases[-1].image_size}px/"
    return {"eval/full/" + k[len(full):]: v for k, v in eval_metrics.items() if k.startswith(full)}


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


def _short(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in metrics.items() if "top1" in k or "r@1" in k}


def _evaluate_phase(cfg: Config, model: torch.nn.Module, tokenizer: Any, plan: Any, schedule: Any, device: torch.device) -> dict[str, float]:
    """Zero-shot + retrieval at the phase's resolution and at full resolution (if they differ)."""
    from reclip_ray.data.schema import ColumnMap
    from reclip_ray.evaluate import evaluate_dataset

    full = schedule.phases[-1]
    sizes = {plan.image_size: plan.text_length}
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
            columns=ColumnMap.from_config(cfg.data),
            device=device,
        )
        out.update({f"eval/{image_size}px/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return out


def _export(
    cfg: Config,
    model: torch.nn.Module,
    tokenizer: Any,
    run_dir: Path,
    tracking_uri: str,
    run_id: str,
    state: TrainState,
    config_yaml: str,
) -> None:
    """Write the inference model next to the checkpoints and into MLflow; atomic on local storage."""
    import pyarrow.fs as pafs

    from reclip_ray import tracking
    from reclip_ray.export import export_model

    with tempfile.TemporaryDirectory(prefix="reclip-export-") as tmp:
        local = Path(tmp) / "model"
        export_model(model, tokenizer, cfg, local)
        (Path(tmp) / "eval.json").write_text(json.dumps(state.eval, indent=2, sort_keys=True))
        tracking.log_artifacts(tracking_uri, run_id, local, "model")
        tracking.log_artifact(tracking_uri, run_id, Path(tmp) / "eval.json")
        target = f"{run_dir}/model"
        if "://" in str(run_dir):
            pafs.copy_files(str(local), target)
        else:
            staging = Path(f"{target}.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(local, staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
    print(f"[reclip] exported model to {run_dir}/model", flush=True)
