"""What a run will cost, from its config alone: FLOPs per phase, the RECLIP saving, GPU hours and decode cores.

``reclip-ray plan`` answers "what will this cost?" before anything is spent: it reads only the config (no Ray, no
data, no torch), so it runs in a second on a laptop for a 64-GPU config. The FLOPs are ``reclip_ray.flops``'s
(the same count the trainer logs as ``gflops_total`` and the sweep budgets with; training = 3x forward), so the
plan, the sweep and the MLflow history agree. Wall time is FLOPs / (GPUs x peak x MFU): an estimate whose only
free parameter is the MFU the user expects, stated in the output. The decode-cores column says how many CPU cores
per GPU must decode JPEGs to keep the GPU fed, which is what a 64 px phase on a fast GPU runs out of first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from reclip_ray.config import (Config, full_image_size, full_text_length, load_config, local_loss_enabled,
                               phase_micro_batch)
from reclip_ray.data.clip_bpe import CLIP_VOCAB_SIZE, selects_clip_bpe
from reclip_ray.errors import ReclipError
from reclip_ray.flops import (image_forward_flops, image_tokens, model_parameters, phase_global_batch,
                              phase_train_flops_per_sample, train_flops_per_sample)
from reclip_ray.memory import step_gpu_bytes
from reclip_ray.run_names import block_rows, row_bytes


@dataclass(frozen=True)
class GpuPeak:
    """A GPU's peak for the precision CLIP trains in, and where the number comes from (so it can be checked)."""

    name: str
    tflops: float
    precision: str
    source: str
    memory_gb: float = 80.0  # the board's memory (GB, as data sheets give it): what a step must fit in


# Dense (no structured sparsity) BF16 tensor-core peaks: training runs in bf16 autocast (train.precision=auto on a
# GPU), and the datasheets' headline BF16 figures for Hopper assume 2:4 sparsity, which training does not use.
GPU_PEAKS: dict[str, GpuPeak] = {
    "h100": GpuPeak("NVIDIA H100 SXM", 989.0, "dense BF16 tensor core",
                    "NVIDIA H100 Tensor Core GPU datasheet: 1,979 TFLOPS BF16 with sparsity, 989 dense", 80.0),
    "a100": GpuPeak("NVIDIA A100 SXM", 312.0, "dense BF16 tensor core",
                    "NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS BF16 dense, 624 with sparsity (the 80 GB board)",
                    80.0),
    "h100-pcie": GpuPeak("NVIDIA H100 PCIe", 756.0, "dense BF16 tensor core",
                         "NVIDIA H100 Tensor Core GPU datasheet: 1,513 TFLOPS BF16 with sparsity, 756 dense", 80.0),
    "h200": GpuPeak("NVIDIA H200 SXM", 989.0, "dense BF16 tensor core",
                    "NVIDIA H200 Tensor Core GPU datasheet: 1,979 TFLOPS BF16 with sparsity, 989 dense "
                    "(H100's compute)", 141.0),
}

# Images/s per core of the project's decode path (JPEG draft mode + one box resize), from BENCHMARKS.md, section
# "Performance report" -> "Data pipeline: images/s per core by resolution", column "project path img/s/core"
# (`reclip-ray bench data --images 200 --sizes 64,128,224 --repeats 5`, 2026-11-29 10:48 UTC, 2-core AMD EPYC,
# 512 px JPEG sources). 32 and 112 px were not measured there; see decode_rate_at for how a missing size is chosen.
DEFAULT_DECODE_RATES: dict[int, float] = {64: 1807.0, 128: 1665.0, 224: 731.0}
DEFAULT_DECODE_SOURCE = ("BENCHMARKS.md, Performance report, data pipeline images/s per core "
                         "(2026-11-29, 2-core AMD EPYC, 512 px JPEG sources)")
DEFAULT_GPU = "h100"
FLOPS_CONVENTION = ("reclip_ray.flops: multiply-add = 2 FLOPs; matmuls, patch conv, attention, the global batch's "
                    "B x B logits; training = 3x forward")
DEFAULT_MFU = 0.4
# A checkpoint's bytes per parameter: fp32 weights and AdamW's two fp32 moments (``train.checkpoint.save_checkpoint``;
# the RNG states and the pickle's framing add ~0.6% for the tiny preset, less for larger models).
CHECKPOINT_BYTES_PER_PARAM = 12
# Blocks/s one phase's split coordinator (one actor: every block of the phase passes through it) is planned to
# carry: half of the ~1,100/s its measured CPU per block allows (0.84-0.94 ms, benchmarks/split_blocks.py with the
# blocks made beforehand, BENCHMARKS.md "Ray Data's split coordinator per block"), as the same actor also runs the
# phase's stream executor. Above it a phase gets a note with the data.block_mb that brings it under.
SPLIT_BLOCKS_PER_S = 550.0
# A phase whose step would take more of a GPU's memory than this share gets a note (reclip_ray.memory's estimate
# leaves out the CUDA context, the allocator's slack and kernels' workspaces).
MEMORY_NOTE_SHARE = 0.85
# Mid-phase checkpoints closer than this get a note: rank 0 writes (and, with checkpoint.upload sync, copies) each one
# inside ``ray.train.report`` while every other rank waits for it at the next step's collectives.
CHECKPOINT_NOTE_S = 300.0
CHECKPOINT_SUGGEST_S = 600.0  # the ``checkpoint.every_minutes`` the notes suggest
# ... and checkpoints further apart than this get one too: a failure redoes everything since the last one.
CHECKPOINT_GAP_NOTE_S = 1800.0


@dataclass
class PhaseCost:
    """One phase's FLOPs and, with hardware given, its wall time and the decode throughput it needs."""

    name: str
    samples: int
    image_size: int
    image_tokens: int  # tokens the ViT's blocks run on in training: kept patches (patch_dropout) + the class token
    text_length: int
    train_gflops_per_sample: float
    train_gflops: float
    patch_dropout: float = 0.0
    share: float = 0.0
    wall_s: Optional[float] = None
    samples_per_s_per_gpu: Optional[float] = None
    decode_rate_per_core: Optional[float] = None
    decode_rate_px: Optional[int] = None
    decode_cores_per_gpu: Optional[float] = None
    checkpoints: int = 0  # written in the phase: at checkpoint.every_samples (and every_minutes), and its end's
    checkpoint_every_s: Optional[float] = None  # with hardware, the mid-phase checkpoints' interval (None: none)
    block_rows: int = 0  # rows per block of the phase's stream (run_names.block_rows: data.block_mb)
    global_batch: int = 0
    step_s: Optional[float] = None  # with hardware, one step's seconds at the priced speed
    # with hardware, the all-reduce bus bandwidth (nccl-tests' busbw) at which DDP's gradient all-reduce takes one
    # step: 2 (N - 1) / N x the gradients' bytes / step_s (0 on one GPU)
    allreduce_busbw_gbs: Optional[float] = None
    gpu_memory_gb: Optional[float] = None  # with hardware, one GPU's memory in a step (reclip_ray.memory, an estimate)
    split_blocks_per_s: Optional[float] = None  # with hardware, blocks/s through the phase's one split coordinator


@dataclass
class Hardware:
    """The GPUs a plan is priced on; ``peak_tflops`` is per GPU."""

    gpu: str
    gpus: int
    mfu: float
    peak_tflops: float
    precision: str
    source: str
    memory_gb: float
    decode_rates_source: str
    decode_rates_per_core: dict[int, float]


@dataclass
class Plan:
    """Everything ``reclip-ray plan`` prints; ``to_dict`` is the ``--json`` object."""

    config: str
    model: str
    train_samples: int
    flops_convention: str
    phases: list[PhaseCost]
    total_train_gflops: float
    full_resolution: dict[str, Any]
    saving_total: float
    saving_image_tower: float
    parameters: int = 0
    checkpoint_bytes: int = 0  # one checkpoint's state.pt, about (CHECKPOINT_BYTES_PER_PARAM)
    checkpoint_every_samples: int = 0  # 0: only at phase ends
    checkpoint_every_minutes: float = 0.0  # 0: off; its checkpoints are counted with --gpus only (a clock's)
    checkpoint_upload: str = "sync"  # sync: every rank waits for the copy to run.storage_path; async: a thread copies
    grad_reduce: str = "fp32"  # the dtype DDP all-reduces gradients in (train.grad_reduce): 4 or 2 bytes each
    hardware: Optional[Hardware] = None
    wall_s: Optional[float] = None
    gpu_hours: Optional[float] = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- inputs


def device_gpu_peak(device_name: str) -> GpuPeak | None:
    """The peak of the GPU ``torch.cuda.get_device_name()`` names ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
    "NVIDIA A100-SXM4-80GB", ...), or None where the table has no row for it. An MFU against the wrong peak is a
    wrong number, not a rough one: an H100 PCIe has 76 % of the SXM's, and the NVL boards (H100 NVL, H200 NVL)
    have their own, so those are None rather than their SXM sibling's."""
    name = device_name.lower()
    if "nvl" in name:
        return None
    if "h200" in name:
        return GPU_PEAKS["h200"]
    if "h100" in name:
        return GPU_PEAKS["h100-pcie" if "pcie" in name else "h100"]
    if "a100" in name:  # SXM and PCIe boards share the A100's 312 dense BF16 TFLOPS
        return GPU_PEAKS["a100"]
    return None


def gpu_peak(name: str) -> GpuPeak:
    """The peak of a GPU by its short name; an unknown name is a one-line error listing the known ones."""
    key = name.strip().lower()
    if key not in GPU_PEAKS:
        raise ReclipError(f"unknown --gpu '{name}'; known: {', '.join(sorted(GPU_PEAKS))}")
    return GPU_PEAKS[key]


def load_decode_rates(path: str | Path) -> dict[int, float]:
    """Per-core decode rates by target px from the JSON lines ``reclip-ray bench data`` prints.

    Only the project's own path counts (``path`` starting with "reclip"; the other rows are the plain-PIL
    baseline), because that is what training runs. Several rows for one size (files of several runs appended)
    give their median, so one noisy run does not decide the plan.
    """
    from reclip_ray.storage import read_text

    try:
        lines = read_text(str(path)).splitlines()  # a local file or a URI
    except OSError as exc:
        raise ReclipError(f"--decode-rates: cannot read {path}: {exc.strerror or exc}") from None
    found: dict[int, list[float]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ReclipError(f"--decode-rates: {path}:{number} is not a JSON line") from None
        if _is_project_decode_row(row):
            found.setdefault(int(row["target_px"]), []).append(float(row["images_per_s_per_core"]))
    if not found:
        raise ReclipError(f"--decode-rates: {path} has no 'reclip' rows with images_per_s_per_core "
                          "(expected the output of `reclip-ray bench data`)")
    return {px: statistics.median(rates) for px, rates in sorted(found.items())}


def _is_project_decode_row(row: Any) -> bool:
    return (isinstance(row, dict) and row.get("bench") == "data_decode"
            and str(row.get("path", "")).startswith("reclip")
            and isinstance(row.get("images_per_s_per_core"), (int, float)) and row["images_per_s_per_core"] > 0
            and isinstance(row.get("target_px"), int))


def decode_rate_at(rates: dict[int, float], size: int) -> tuple[float, int]:
    """The per-core rate to plan a ``size`` px phase with, and the measured size it comes from.

    A missing size takes the next larger measured size: decoding to a larger target is never faster, so the plan
    errs towards too many cores. Above every measured size the largest is used, which is optimistic; the caller
    says so in the notes either way.
    """
    larger = [px for px in rates if px >= size]
    px = min(larger) if larger else max(rates)
    return rates[px], px


# ---------------------------------------------------------------------------------------------------- FLOPs


def phase_costs(cfg: Config) -> list[PhaseCost]:
    """Per-phase training FLOPs from ``reclip_ray.flops`` (the same count ``run_flops`` and the trainer use), and
    the checkpoints each phase writes."""
    from reclip_ray.schedule import Schedule

    out = []
    plans = Schedule.from_config(cfg).phases
    for i, (ph, samples) in enumerate(zip(cfg.phases, cfg.phase_samples())):
        per_sample = phase_train_flops_per_sample(cfg, i)
        out.append(PhaseCost(
            name=ph.name, samples=samples, image_size=ph.image_size,
            image_tokens=image_tokens(cfg.model.vision, ph.image_size, ph.patch_dropout), text_length=ph.text_length,
            train_gflops_per_sample=per_sample / 1e9, train_gflops=per_sample * samples / 1e9,
            patch_dropout=ph.patch_dropout, checkpoints=phase_checkpoints(plans[i], cfg.checkpoint.every_samples),
            block_rows=block_rows(cfg, ph.image_size), global_batch=phase_global_batch(cfg, i),
        ))
    total = sum(p.train_gflops for p in out)
    for p in out:
        p.share = p.train_gflops / total
    return out


def run_checkpoints(cfg: Config, phase_wall_s: list[float] | None = None) -> list[int]:
    """Checkpoints each phase writes, decided step by step as ``Worker.run_phase`` decides them: at each step that
    takes the sample count past a multiple of ``checkpoint.every_samples``, at a log window ``every_minutes`` after
    the last checkpoint, unless that step ends the phase, plus the phase end's. The clock's checkpoints need a
    speed: each phase's wall time (``phase_wall_s``, the plan's with ``--gpus``), at which its samples go by
    evenly; start-up, evaluation and the checkpoints' own writes are not on that clock. Without one, only the
    samples' (``phase_checkpoints``, in closed form)."""
    from reclip_ray.schedule import Schedule

    plans = Schedule.from_config(cfg).phases
    every, every_s = cfg.checkpoint.every_samples, 60.0 * cfg.checkpoint.every_minutes
    if not every_s or phase_wall_s is None:
        return [phase_checkpoints(plan, every) for plan in plans]
    counts, step, now, last = [], 0, 0.0, 0.0
    for plan, wall_s in zip(plans, phase_wall_s):
        seconds_per_sample, samples, n = wall_s / (plan.end_sample - plan.start_sample), plan.start_sample, 0
        while samples < plan.end_sample:
            before, step = samples, step + 1
            samples += plan.batch_at(samples)
            now += (samples - before) * seconds_per_sample
            end = samples >= plan.end_sample
            due = (step % cfg.train.log_every_steps == 0 or end) and now - last >= every_s
            if not end and (due or (every and samples // every > before // every)):
                n, last = n + 1, now
        counts.append(n + 1)
        last = now  # the phase end's checkpoint
    return counts


def phase_checkpoints(plan: Any, every: int) -> int:
    """Checkpoints the trainer writes in a phase (a ``schedule.PhasePlan``): one at each step that takes the sample
    count past a multiple of ``every`` (``Worker.run_phase``; 0: none), unless that step ends the phase, plus the
    phase end's. Every step but the last ends at ``start + k * batch``; a step crosses at most one multiple when
    ``every >= batch``, and at least one otherwise."""
    if not every:
        return 1
    last_mid = plan.start_sample + (plan.steps - 1) * plan.batch_size  # where the phase's last step starts
    crossed = plan.steps - 1 if every < plan.batch_size else last_mid // every - plan.start_sample // every
    return crossed + 1


def full_resolution(cfg: Config) -> dict[str, Any]:
    """The baseline RECLIP is measured against: every sample at the full image size and text length (the final
    model's, ``config.full_image_size``: a sweep trial without its finetune keeps the finetune's), at the last
    phase's batch, with every patch (plain CLIP: the saving of a schedule with patch dropout includes dropout's)."""
    size, length = full_image_size(cfg), full_text_length(cfg)
    per_sample = train_flops_per_sample(cfg.model, size, length, phase_global_batch(cfg, -1))
    return {
        "image_size": size,
        "image_tokens": image_tokens(cfg.model.vision, size),
        "text_length": length,
        "samples": cfg.train.samples,
        "train_gflops_per_sample": per_sample / 1e9,
        "train_gflops": per_sample * cfg.train.samples / 1e9,
    }


def image_tower_saving(cfg: Config) -> float:
    """Full-resolution image-tower FLOPs over the schedule's; the 3x training factor cancels in the ratio."""
    vision, embed = cfg.model.vision, cfg.model.embed_dim
    full = image_forward_flops(vision, full_image_size(cfg), embed) * cfg.train.samples
    spent = sum(image_forward_flops(vision, ph.image_size, embed, ph.patch_dropout) * n
                for ph, n in zip(cfg.phases, cfg.phase_samples()))
    return full / spent


# ---------------------------------------------------------------------------------------------------- hardware


def wall_seconds(train_gflops: float, gpus: int, peak_tflops: float, mfu: float) -> float:
    """Seconds to spend ``train_gflops`` on ``gpus`` GPUs that each reach ``mfu`` of ``peak_tflops``."""
    return train_gflops * 1e9 / (gpus * peak_tflops * 1e12 * mfu)


def _price_phases(plan: Plan, hw: Hardware) -> None:
    """Fill each phase's wall time, the samples/s per GPU it implies and the decode cores that rate needs."""
    for p in plan.phases:
        p.wall_s = wall_seconds(p.train_gflops, hw.gpus, hw.peak_tflops, hw.mfu)
        p.samples_per_s_per_gpu = p.samples / p.wall_s / hw.gpus
        p.decode_rate_per_core, p.decode_rate_px = decode_rate_at(hw.decode_rates_per_core, p.image_size)
        p.decode_cores_per_gpu = p.samples_per_s_per_gpu / p.decode_rate_per_core
        if p.decode_rate_px > p.image_size:
            plan.notes.append(f"phase '{p.name}': no decode rate measured at {p.image_size} px; used "
                              f"{p.decode_rate_px} px's (the next larger size measured: errs towards more cores)")
        elif p.decode_rate_px < p.image_size:
            plan.notes.append(f"phase '{p.name}': {p.image_size} px is above every measured decode size; used "
                              f"{p.decode_rate_px} px's rate (optimistic: too few cores)")
        p.split_blocks_per_s = p.samples_per_s_per_gpu * hw.gpus / p.block_rows
        p.step_s = p.global_batch / (p.samples_per_s_per_gpu * hw.gpus)
        grad_bytes = (2 if plan.grad_reduce == "bf16" else 4) * plan.parameters
        p.allreduce_busbw_gbs = 2 * (hw.gpus - 1) / hw.gpus * grad_bytes / p.step_s / 1e9
    plan.wall_s = sum(p.wall_s for p in plan.phases)
    plan.gpu_hours = plan.wall_s * hw.gpus / 3600
    full = plan.full_resolution
    full["wall_s"] = wall_seconds(full["train_gflops"], hw.gpus, hw.peak_tflops, hw.mfu)
    full["gpu_hours"] = full["wall_s"] * hw.gpus / 3600


def _price_memory(plan: Plan, cfg: Config, hw: Hardware) -> None:
    """Each phase's GPU memory per worker in a step (``memory.step_gpu_bytes``), and a note with the
    ``train.micro_batch_size`` that fits where it would take more than ``MEMORY_NOTE_SHARE`` of the board."""
    local = local_loss_enabled(cfg.train.local_loss, hw.gpus)
    checkpointing = cfg.train.grad_checkpointing or cfg.model.grad_checkpointing
    budget = MEMORY_NOTE_SHARE * hw.memory_gb * 1e9
    for i, p in enumerate(plan.phases):
        ph = cfg.phases[i]
        rows = math.ceil(p.global_batch / hw.gpus)

        def need(micro_batch: int) -> float:
            return step_gpu_bytes(cfg.model, plan.parameters, p.image_size, p.text_length, rows=rows,
                                  global_batch=p.global_batch, micro_batch=micro_batch, local_loss=local,
                                  patch_dropout=ph.patch_dropout, grad_checkpointing=checkpointing)

        p.gpu_memory_gb = need(phase_micro_batch(cfg, i)) / 1e9
        if p.gpu_memory_gb * 1e9 <= budget:
            continue
        fits = next((m for m in range((rows - 1) // 8 * 8, 0, -8) if need(m) <= budget), None)  # under the share
        what = (f"set phases.{i}.micro_batch_size={fits} (exact accumulation: {_gb(need(fits))})" if fits else
                "no micro-batch fits: more GPUs, train.grad_checkpointing, or a smaller model")
        plan.notes.append(f"phase '{p.name}': ~{_gb(p.gpu_memory_gb * 1e9)} per GPU in a step ({rows:,} rows per "
                          f"worker), over {MEMORY_NOTE_SHARE:.0%} of a {hw.memory_gb:g} GB {GPU_PEAKS[hw.gpu].name}; "
                          f"{what}")


def _price_split(plan: Plan, cfg: Config, hw: Hardware) -> None:
    """A note for each phase whose blocks would pass through its split coordinator faster than it is planned to
    carry (``SPLIT_BLOCKS_PER_S``), with one ``data.block_mb`` (and, past one read unit, ``data.chunk_rows``) that
    brings every phase under: the keys are the run's, not a phase's. The split holds about a block per worker back
    to keep the ranks' rows equal: that much of the object store, said too."""
    d = cfg.data
    over = [p for p in plan.phases if (p.split_blocks_per_s or 0) > SPLIT_BLOCKS_PER_S]
    if not over:
        return
    on_device = d.decode_device == "cuda"
    rows = {p.name: math.ceil(p.samples_per_s_per_gpu * hw.gpus / SPLIT_BLOCKS_PER_S) for p in over}
    block_mb = max(math.ceil(rows[p.name] * row_bytes(p.image_size, on_device) / (1 << 20)) for p in over)
    chunk_rows = max(d.chunk_rows, *(math.ceil(n / d.group_shards) for n in rows.values()))  # a block <= a unit
    fix = [f"data.block_mb={block_mb}"] + [f"data.chunk_rows={chunk_rows}"] * (chunk_rows > d.chunk_rows)
    fixed = dataclasses.replace(cfg, data=dataclasses.replace(d, block_mb=block_mb, chunk_rows=chunk_rows))
    for p in over:
        size = block_rows(fixed, p.image_size)
        plan.notes.append(
            f"phase '{p.name}': {p.split_blocks_per_s:,.0f} blocks/s (of {p.block_rows:,} rows) through the phase's "
            f"one split coordinator, over the {SPLIT_BLOCKS_PER_S:,.0f}/s planned for it (half of what its CPU per "
            f"block allows); {' '.join(fix)} make its blocks {size:,} rows (the split holds about one per worker "
            f"back: {_gb(hw.gpus * size * row_bytes(p.image_size, on_device))} of object store)")


def _price_checkpoints(plan: Plan, cfg: Config, hw: Hardware) -> None:
    """At the priced speed: the checkpoints each phase writes (``every_minutes``' too), how far apart, and a note
    where that is under 5 minutes (every rank waits while rank 0 writes one) or over 30 (a failure redoes that)."""
    for p, count in zip(plan.phases, run_checkpoints(cfg, [p.wall_s for p in plan.phases])):
        p.checkpoints = count
        rate = p.samples_per_s_per_gpu * hw.gpus
        intervals = [s for s in (plan.checkpoint_every_samples / rate, 60.0 * plan.checkpoint_every_minutes) if s]
        p.checkpoint_every_s = min(intervals) if count > 1 else None
        fix = " ".join(["checkpoint.every_samples=0"] * bool(plan.checkpoint_every_samples)
                       + [f"checkpoint.every_minutes={CHECKPOINT_SUGGEST_S / 60:g}"])
        fix += f" checkpoints about every {_duration(CHECKPOINT_SUGGEST_S)} on any number of GPUs"
        gap = p.checkpoint_every_s or p.wall_s
        if gap > CHECKPOINT_GAP_NOTE_S:
            plan.notes.append(f"phase '{p.name}': {_duration(gap)} between checkpoints on {hw.gpus} GPUs: a failure "
                              f"redoes up to that; {fix}")
        if p.checkpoint_every_s is not None and p.checkpoint_every_s < CHECKPOINT_NOTE_S:
            held = ("writes each to local disk while the other ranks wait (checkpoint.upload async: a thread copies "
                    "it)" if plan.checkpoint_upload == "async" else "writes and copies each while the other ranks wait")
            plan.notes.append(
                f"phase '{p.name}': a checkpoint every {_duration(p.checkpoint_every_s)} ({p.checkpoints} in "
                f"{_duration(p.wall_s)}, {_gb(plan.checkpoint_bytes)} each): rank 0 {held}; {fix}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _hardware(gpus: int, gpu: str, mfu: float, decode_rates: str | None) -> Hardware:
    """Validate the hardware flags into a ``Hardware``; every mistake is a one-line error."""
    if gpus < 1:
        raise ReclipError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ReclipError(f"--mfu must be in (0, 1], got {mfu}")
    peak = gpu_peak(gpu)
    rates = load_decode_rates(decode_rates) if decode_rates else dict(DEFAULT_DECODE_RATES)
    source = f"{decode_rates} (reclip-ray bench data)" if decode_rates else DEFAULT_DECODE_SOURCE
    return Hardware(gpu=gpu.strip().lower(), gpus=gpus, mfu=mfu, peak_tflops=peak.tflops, precision=peak.precision,
                    source=peak.source, memory_gb=peak.memory_gb, decode_rates_source=source,
                    decode_rates_per_core=rates)


# ---------------------------------------------------------------------------------------------------- plan


def make_plan(cfg: Config, gpus: int | None = None, gpu: str | None = None, mfu: float | None = None,
              decode_rates: str | None = None) -> Plan:
    """The plan of a validated config; hardware flags without ``gpus`` are an error, not silently ignored."""
    if gpus is None and (gpu is not None or mfu is not None or decode_rates is not None):
        raise ReclipError("--gpu, --mfu and --decode-rates price the run on GPUs: add --gpus N")
    phases = phase_costs(cfg)
    full = full_resolution(cfg)
    notes = [f"phase '{p.name}': patch_dropout {p.patch_dropout:g} runs {p.image_tokens - 1} of "
             f"{(p.image_size // cfg.model.vision.patch_size) ** 2} patch tokens (+ the class token) per training "
             "sample; evaluation runs all" for p in phases if p.patch_dropout > 0]
    total = sum(p.train_gflops for p in phases)
    plan = Plan(
        config=cfg.name, model=cfg.model.name, train_samples=cfg.train.samples,
        flops_convention=FLOPS_CONVENTION,
        phases=phases, total_train_gflops=total, full_resolution=full,
        saving_total=full["train_gflops"] / total, saving_image_tower=image_tower_saving(cfg), notes=notes,
    )
    plan.parameters = model_parameters(cfg.model, vocab_size(cfg))
    plan.checkpoint_bytes = CHECKPOINT_BYTES_PER_PARAM * plan.parameters
    plan.checkpoint_every_samples = cfg.checkpoint.every_samples
    plan.checkpoint_every_minutes = cfg.checkpoint.every_minutes
    plan.checkpoint_upload = cfg.checkpoint.upload
    plan.grad_reduce = cfg.train.grad_reduce
    if cfg.data.tokenizer and not cfg.model.text.vocab_size and not selects_clip_bpe(cfg.data.tokenizer):
        notes.append(f"parameters counted with data.vocab_size {cfg.data.vocab_size:,}; the model takes "
                     f"{cfg.data.tokenizer}'s own vocabulary")
    if gpus is not None:
        plan.hardware = _hardware(gpus, gpu or DEFAULT_GPU, DEFAULT_MFU if mfu is None else mfu, decode_rates)
        _price_phases(plan, plan.hardware)
        _price_memory(plan, cfg, plan.hardware)
        _price_split(plan, cfg, plan.hardware)
        _price_checkpoints(plan, cfg, plan.hardware)
    return plan


def vocab_size(cfg: Config) -> int:
    """The vocabulary the model is built with, which is its tokenizer's (``build_model(..., tokenizer=)``): CLIP's
    49,408 tokens for the CLIP BPE (``clip_bpe.CLIP_VOCAB_SIZE``, which its conversion checks), else
    ``model.text.vocab_size`` when set, else ``data.vocab_size`` (a tokenizer trained at launch has that size; a
    tokenizer file's own is not read here: the plan notes it)."""
    if selects_clip_bpe(cfg.data.tokenizer):
        return CLIP_VOCAB_SIZE
    return cfg.model.text.vocab_size or cfg.data.vocab_size


def plan_run(config: str | None, overrides: list[str] | None = None, **hardware: Any) -> Plan:
    """Load the config (preset or YAML plus ``--set``) and plan it; a bad config is a ``ConfigError``."""
    cfg = load_config(config, overrides)
    return make_plan(cfg, **hardware)


# ---------------------------------------------------------------------------------------------------- text


def _duration(seconds: float) -> str:
    """A wall time in the unit a person reads it in (seconds, minutes, hours, days)."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


_FLOPS_HEAD = f"{'phase':<10} {'samples':>14} {'px':>5} {'img tokens':>10} {'text len':>8} " \
              f"{'GFLOP/sample':>12} {'phase GFLOP':>12} {'share':>6}"
_HW_HEAD = (f"{'phase':<10} {'wall':>9} {'samples/s/GPU':>14} {'decode img/s/core (px)':>23} {'decode cores/GPU':>16} "
            f"{'checkpoint every':>16} {'step':>8} {'all-reduce busbw':>16} {'GPU memory':>10}")


def _flops_row(name: str, samples: int, size: int, tokens: int, text: int, per_sample: float, gflops: float,
               share: float | None) -> str:
    shown = "" if share is None else f"{share:.1%}"  # the full-resolution row is not a share of this run
    return (f"{name:<10} {samples:>14,} {size:>5} {tokens:>10} {text:>8} {per_sample:>12.3f} {gflops:>12.4e} "
            f"{shown:>6}")


def _hw_row(p: PhaseCost) -> str:
    rate = f"{p.decode_rate_per_core:,.0f} ({p.decode_rate_px})"
    every = "phase end" if p.checkpoint_every_s is None else _duration(p.checkpoint_every_s)
    busbw = f"{p.allreduce_busbw_gbs:,.1f} GB/s" if p.allreduce_busbw_gbs else "-"
    return (f"{p.name:<10} {_duration(p.wall_s or 0):>9} {p.samples_per_s_per_gpu:>14,.0f} {rate:>23} "
            f"{p.decode_cores_per_gpu:>16.1f} {every:>16} {_step(p.step_s or 0):>8} {busbw:>16} "
            f"{p.gpu_memory_gb or 0:>7.1f} GB")


def _step(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else _duration(seconds)


def format_plan(plan: Plan) -> str:
    """The fixed-width table ``reclip-ray plan`` prints (``--json`` has the same numbers, unrounded)."""
    full = plan.full_resolution
    lines = [f"plan: config {plan.config}, model {plan.model}, {plan.train_samples:,} samples",
             f"FLOPs: {plan.flops_convention}", "", _FLOPS_HEAD]
    lines += [_flops_row(p.name, p.samples, p.image_size, p.image_tokens, p.text_length, p.train_gflops_per_sample,
                         p.train_gflops, p.share) for p in plan.phases]
    lines.append(f"{'total':<10} {plan.train_samples:>14,} {'':>5} {'':>10} {'':>8} {'':>12} "
                 f"{plan.total_train_gflops:>12.4e} {1:>6.1%}")
    lines.append(_flops_row("full res", full["samples"], full["image_size"], full["image_tokens"], full["text_length"],
                            full["train_gflops_per_sample"], full["train_gflops"], None))
    lines += ["", f"RECLIP saving vs full resolution: {plan.saving_total:.2f}x total, "
                  f"{plan.saving_image_tower:.2f}x image tower"]
    lines += [_checkpoint_line(plan)]
    if plan.hardware is not None:
        lines += _format_hardware(plan, plan.hardware)
    else:
        lines += ["", "add --gpus N [--gpu h100|a100|h200] [--mfu 0.4] for wall time and decode cores per GPU"]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(line.rstrip() for line in lines)


def _checkpoint_line(plan: Plan) -> str:
    when = [f"every {plan.checkpoint_every_samples:,} samples"] * bool(plan.checkpoint_every_samples)
    when += [f"every {plan.checkpoint_every_minutes:g} min"] * bool(plan.checkpoint_every_minutes)
    counts = ", ".join(f"{p.checkpoints} in {p.name}" for p in plan.phases)
    total = sum(p.checkpoints for p in plan.phases) * plan.checkpoint_bytes
    written = f"{counts} ({_gb(total)} written)"
    if plan.checkpoint_every_minutes:  # a clock's checkpoints: estimated at the priced speed, else not counted
        written = (f"about {written} at the speed below" if plan.hardware else
                   f"{counts}, plus the clock's (--gpus estimates them)")
    return (f"checkpoints: {_gb(plan.checkpoint_bytes)} each ({plan.parameters:,} parameters: fp32 weights and "
            f"AdamW's two moments), {' and '.join(when + ['at each phase end'])}: {written}")


def _format_hardware(plan: Plan, hw: Hardware) -> list[str]:
    name = GPU_PEAKS[hw.gpu].name
    lines = ["", f"on {hw.gpus} x {name} at {hw.peak_tflops:g} TFLOP/s ({hw.precision}) x MFU {hw.mfu:g}:", _HW_HEAD]
    lines += [_hw_row(p) for p in plan.phases]
    full = plan.full_resolution
    lines.append(f"{'total':<10} {_duration(plan.wall_s or 0):>9}  ({plan.gpu_hours:,.1f} GPU-hours)")
    lines.append(f"{'full res':<10} {_duration(full['wall_s']):>9}  ({full['gpu_hours']:,.1f} GPU-hours)")
    lines += ["", f"peak: {hw.source}", f"decode rates: {hw.decode_rates_source}"]
    return lines


__all__ = ["GPU_PEAKS", "DEFAULT_DECODE_RATES", "Plan", "PhaseCost", "Hardware", "make_plan", "plan_run",
           "format_plan", "load_decode_rates", "decode_rate_at", "wall_seconds", "device_gpu_peak"]
