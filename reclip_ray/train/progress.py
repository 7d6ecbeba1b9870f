"""What a rank says about training between checkpoints: the metrics of one logging window (for MLflow and the
driver's display) and the console line of a run without a display (a sweep trial)."""

from __future__ import annotations

import time
from typing import Any

from reclip_ray.train.checkpoint import TrainState


class Window:
    """Counters of one logging window."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        # Host time taking batches from the feed (and decoding on the device). The steps' kernels run on while the
        # host takes the next batch (train_step returns tensors), so on a GPU this bounds the time the GPU waited
        # for data from above rather than measuring it.
        self.data_s = 0.0
        self.steps = 0
        self.samples = 0

    def metrics(self, plan: Any, state: TrainState, last: dict[str, float], lr: float, local_batch: int,
                world: int) -> dict[str, float]:
        """The window's metrics at its last step (``last``: that step's ``train_step`` output)."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {
            "loss": last["loss"], "lr": lr, "logit_scale": last["logit_scale"], "samples_per_s": self.samples / elapsed,
            "data_wait_fraction": self.data_s / elapsed, "phase": plan.index, "image_size": plan.image_size,
            "text_length": plan.text_length, "samples": state.samples, "gflops_total": state.gflops,
            "workers": world, "local_batch": local_batch, "worker_peak_rss_mib": peak_rss_mib(),
            **({"logit_bias": last["logit_bias"]} if "logit_bias" in last else {}),  # train.loss: siglip
            "worker_peak_gpu_mib": peak_gpu_mib(),
        }


def remaining_samples(schedule: Any, samples: int) -> int:
    """Samples left in the whole schedule from ``samples`` on."""
    return sum(p.end_sample - max(p.start_sample, samples) for p in schedule.phases if p.end_sample > samples)


def board_update(metrics: dict[str, float], plan: Any, state: TrainState, schedule: Any) -> dict[str, Any]:
    """The window as the driver's display draws it: the metrics, the position in the schedule and an ETA."""
    eta = remaining_samples(schedule, state.samples) / max(metrics["samples_per_s"], 1e-9)
    return {**metrics, "phase_name": plan.name, "step": state.step, "total_steps": schedule.total_steps,
            "total_samples": schedule.total_samples, "eta_s": eta}


def console_line(metrics: dict[str, float], plan: Any, state: TrainState, schedule: Any) -> str:
    sps = metrics["samples_per_s"]
    bias = f"bias {metrics['logit_bias']:.2f} " if "logit_bias" in metrics else ""
    eta = remaining_samples(schedule, state.samples) / max(sps, 1e-9)
    return (f"[reclip] {plan.name} {plan.image_size}px step {state.step}/{schedule.total_steps} "
            f"samples {state.samples}/{schedule.total_samples} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
            f"scale {metrics['logit_scale']:.1f} {bias}{sps:.0f} samples/s data-wait {metrics['data_wait_fraction']:.0%} "
            f"GFLOPs {state.gflops:.1f} ETA {eta:.0f}s")


def phase_banner(plan: Any, state: TrainState, world: int, micro_batch: int, gflops_per_sample: float) -> str:
    """The line that opens a phase: its resolution, samples, batch per worker and cost per sample."""
    local = -(-plan.batch_size // world)  # the larger share of a full step
    shares = f"{plan.batch_size // world}-{local}" if plan.batch_size % world else f"{local}"
    return (f"phase {plan.index} '{plan.name}': {plan.image_size} px, {plan.text_length} tokens, samples "
            f"{state.samples:,}..{plan.end_sample:,}, global batch {plan.batch_size} ({shares} per "
            f"worker{micro_note(micro_batch, local)}), {gflops_per_sample:.3f} train GFLOPs/sample")


def micro_note(micro: int, local: int) -> str:
    """Say when a worker accumulates: its share of the global batch is over its phase's micro-batch."""
    return f" in {-(-local // micro)} micro-batches of <= {micro}" if 0 < micro < local else ""


def peak_gpu_mib() -> float:
    """Peak GPU memory this worker's tensors held since its phase began (``Worker.run_phase`` resets the peak), the
    number that says how far a phase's batch is from the card's memory; 0 on a CPU worker (CUDA never started)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mib() -> float:
    """This worker process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
