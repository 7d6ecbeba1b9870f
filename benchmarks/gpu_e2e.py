"""Helpers of ``benchmarks/gpu_check.sh --e2e`` (the real ``reclip-ray train`` job on the lent GPU): the data, the wait
for a run's first checkpoint (the kill-and-resume check) and the per-phase table read back from MLflow.

  python benchmarks/gpu_e2e.py data OUT --train N --eval M --size PX --shrink 80
  python benchmarks/gpu_e2e.py wait-checkpoint RUN_DIR --timeout S [--pid P]   exits 0 once Ray Train has
        registered a checkpoint, 1 after S seconds or once process P (the job) has exited
  python benchmarks/gpu_e2e.py phases --tracking-uri URI --experiment NAME --label L --peak-flops F
        --config C [--set K=V ...] [--cpu-log F]   one JSON line per phase: samples/s, step time, data wait, MFU,
        peak GPU memory, and with the cpu-sample log the cores Ray Data's tasks kept busy feeding the GPU
  python benchmarks/gpu_e2e.py cpu-sample OUT_JSONL [--interval S]   until SIGTERM: each process's CPU time from
        /proc, summed by what it works for (``cpu_group``), one JSON line per interval

Steady state: the median over a phase's logging windows, its first window dropped (the worker group, the data
pipeline's start and a compile fall in it), as ``reclip-ray bench e2e`` does.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import sys
import time
from typing import Any



def make_data(args: argparse.Namespace) -> int:
    from reclip_ray.data.copies import shrink_dataset
    from reclip_ray.data.synth import make_synthetic

    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(args.out, "train", "dataset.json")):
        make_synthetic(args.out, train=args.train, eval=args.eval, seed=0, image_size=args.size)
    synth_s = time.perf_counter() - t0
    train = os.path.join(args.out, "train")
    copies = shrink_dataset(train, [int(s) for s in args.shrink.split(",")], log=None) if args.shrink else {}
    print(json.dumps({"e2e": "data", "train": args.train, "eval": args.eval, "size": args.size, "shrink": args.shrink,
                      "synth_s": round(synth_s, 1), "total_s": round(time.perf_counter() - t0, 1),
                      "copies": copies}, default=str), flush=True)
    return 0


def registered_checkpoints(run_dir: str) -> list[str]:
    """The checkpoints Ray Train has registered (its snapshot in the run folder), whose meta.json is there. A
    checkpoint_s<samples>_p<phase> folder alone may still be being copied: with ``checkpoint.upload: async`` (the
    vit-b-16 preset) training goes on meanwhile, and a kill then resumes from the checkpoint before."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            snapshot = json.load(f)
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
    names = [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]
    return sorted(n for n in names if os.path.isfile(os.path.join(run_dir, n, "meta.json")))


def wait_checkpoint(args: argparse.Namespace) -> int:
    """Poll the run folder for a checkpoint Ray Train has registered (``registered_checkpoints``)."""
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        found = registered_checkpoints(args.run_dir)
        if found:
            print(json.dumps({"e2e": "checkpoint_seen", "checkpoint": os.path.basename(found[0])}), flush=True)
            return 0
        if args.pid and not os.path.exists(f"/proc/{args.pid}"):  # the job ended (failed) before any checkpoint
            break
        time.sleep(0.5)
    print(json.dumps({"e2e": "checkpoint_seen", "checkpoint": None}), flush=True)
    return 1


def _run_id(uri: str, experiment: str) -> tuple[str, str]:
    from reclip_ray import tracking

    client = tracking.client(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]) if exp else []
    if not runs:
        raise SystemExit(f"no MLflow run in experiment {experiment!r} of {uri}")
    return runs[0].info.run_id, runs[0].info.status


def cpu_group(title: str) -> str:
    """What a process's CPU time is spent on, by the title Ray gives a worker process (``setproctitle``, read back
    from /proc/PID/cmdline): ``data`` for Ray Data's tasks (the fused read + decode ``MapBatches``) and the stream's
    split coordinator, ``train`` for the Ray Train worker (its step, and its share of the feed: collating, the
    shuffle window), ``other`` for the rest (the driver, Ray's own daemons, idle workers, this sampler)."""
    if "MapBatches(" in title or "ReadItems" in title or "SplitCoordinator" in title:
        return "data"
    if "TrainWorker" in title:
        return "train"
    return "other"


def _proc_cpu() -> dict[tuple[int, int], tuple[float, str]]:
    """{(pid, start tick): (CPU seconds so far, title)} of every process readable in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone between listdir and open
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the (comm), which may hold spaces
        out[(int(pid), int(fields[19]))] = ((int(fields[11]) + int(fields[12])) / tick, title)
    return out


def cpu_deltas(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two ``_proc_cpu`` readings, by ``cpu_group`` of each process's title: the current
    one, or the earlier one where the process is back to ``ray::IDLE`` (a data task that ended in between ran in
    that time, not the idle worker). A process born in between counts from zero; one that died in between is lost
    (its last interval only)."""
    spent = {"data": 0.0, "train": 0.0, "other": 0.0}
    for key, (cpu, title) in after.items():
        was_cpu, was_title = before.get(key, (0.0, ""))
        group = cpu_group(title)
        spent[group if group != "other" else cpu_group(was_title)] += max(0.0, cpu - was_cpu)
    return spent


def cpu_sample(args: argparse.Namespace) -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    last = _proc_cpu()
    with open(args.out, "a") as f:
        while True:
            time.sleep(args.interval)
            now = _proc_cpu()
            f.write(json.dumps({"t": round(time.time(), 3), **{k: round(v, 3) for k, v in
                                                               cpu_deltas(last, now).items()}}) + "\n")
            f.flush()
            last = now


def data_cores(windows: list[tuple[float, float]], samples: list[dict[str, float]]) -> float | None:
    """Mean cores Ray Data's tasks kept busy over the logging windows ``(start, end]`` (epoch seconds): the ``data``
    CPU seconds the sampler saw in them over their total length. None without samples inside them."""
    spent = [s["data"] for s in samples if any(a < s["t"] <= b for a, b in windows)]
    length = sum(b - a for a, b in windows)
    return round(sum(spent) / length, 2) if spent and length > 0 else None


def phase_data_cpu(logged: dict[int, list[float]], samples: list[dict[str, float]]) -> dict[int, float]:
    """Data CPU-seconds per phase over the whole run: each sampler reading goes to the phase of the first logging
    time at or after it (the data a task reads is trained on later, never earlier). Unlike ``data_cores``, this does
    not depend on when the reads happen: a phase whose rows fit in the read-ahead (the feed's shuffle window and Ray
    Data's prefetch) is read before its steady windows, where ``data_cores`` sees none (the CPU dry run's phases).
    Readings after the last logging time are left out."""
    marks = sorted((t, phase) for phase, times in logged.items() for t in times)
    spent: dict[int, float] = {phase: 0.0 for phase in logged}
    for s in samples:
        at = bisect.bisect_left(marks, (s["t"], -1))
        if at < len(marks):
            spent[marks[at][1]] += s["data"]
    return spent


def steady_windows(timestamps: list[float]) -> list[tuple[float, float]]:
    """A phase's logging windows as (start, end) from the consecutive logging times of its steps, dropping any
    longer than 3x the median: a kill and a resume fall between two of a phase's windows (the e2e job's lowres)."""
    spans = [(a, b) for a, b in zip(timestamps, timestamps[1:]) if b > a]
    if not spans:
        return []
    typical = statistics.median(b - a for a, b in spans)
    return [(a, b) for a, b in spans if b - a <= 3 * typical]


def phase_rows(uri: str, run_id: str, cfg: Any, peak_flops: float) -> list[dict[str, Any]]:
    """Per phase: steady samples/s, step time (global batch / samples/s), data-wait fraction, MFU, peak GPU MiB, and
    ``reclip_ray.memory``'s estimate of it (what ``reclip-ray plan`` prices), to check the one against the other."""
    from reclip_ray import tracking
    from reclip_ray.config import local_loss_enabled, phase_micro_batch
    from reclip_ray.flops import model_parameters, phase_global_batch, phase_train_flops_per_sample
    from reclip_ray.memory import step_gpu_bytes

    keys = ["samples_per_s", "phase", "data_wait_fraction", "worker_peak_gpu_mib", "local_batch", "workers"]
    hist = {k: dict(v) for k, v in tracking.metric_history(uri, run_id, keys).items()}
    rows = []
    for index, phase in enumerate(cfg.phases):
        steps = sorted(s for s, p in hist.get("phase", {}).items() if int(p) == index)
        steady = steps[1:] if len(steps) > 2 else steps
        if not steps:
            rows.append({"phase": phase.name, "image_size": phase.image_size, "windows": 0})
            continue
        sps = statistics.median(hist["samples_per_s"][s] for s in steady)
        batch = phase_global_batch(cfg, index)
        flops = phase_train_flops_per_sample(cfg, index)
        gpu = [hist.get("worker_peak_gpu_mib", {}).get(s) for s in steps]
        workers = max(1, int(hist["workers"][steps[-1]]))
        estimate = step_gpu_bytes(
            cfg.model, model_parameters(cfg.model, cfg.model.text.vocab_size or cfg.data.vocab_size),
            phase.image_size, phase.text_length, rows=-(-batch // workers), global_batch=batch,
            micro_batch=phase_micro_batch(cfg, index), local_loss=local_loss_enabled(cfg.train.local_loss, workers),
            patch_dropout=phase.patch_dropout,
            grad_checkpointing=cfg.train.grad_checkpointing or cfg.model.grad_checkpointing)
        rows.append({
            "phase": phase.name, "image_size": phase.image_size, "text_length": phase.text_length,
            "global_batch": batch, "windows": len(steps), "samples_per_s": round(sps, 1),
            "step_s": round(batch / sps, 4), "data_wait": round(statistics.median(
                hist["data_wait_fraction"][s] for s in steady), 4),
            "train_gflops_per_sample": round(flops / 1e9, 2),
            "mfu": round(sps * flops / (peak_flops * workers), 4),
            "peak_gpu_mib": max((g for g in gpu if g is not None), default=None),
            "estimate_gpu_mib": round(estimate / 2**20),
        })
    return rows


def phases(args: argparse.Namespace) -> int:
    from reclip_ray.config import load_config, split_samples

    cfg = load_config(args.config, args.set)
    run_id, status = _run_id(args.tracking_uri, args.experiment)
    peak, source = peak_flops(args.peak_flops)
    cores = _data_cores_by_phase(args.tracking_uri, run_id, len(cfg.phases), args.cpu_log)
    trained = split_samples([p.samples for p in cfg.phases], cfg.train.samples)
    for index, row in enumerate(phase_rows(args.tracking_uri, run_id, cfg, peak)):
        extra = {}
        if args.cpu_log:  # cores per GPU: the data cores over the GPUs they fed (one worker per GPU)
            busy, spent = cores[index]
            sps = row.get("samples_per_s")
            # The whole-run measure: CPU-seconds per sample at the steady rate. Its samples are the phase's own, so
            # rows read twice around a kill (job 1's lowres: the killed attempt's read-ahead, then the resume's
            # reads from its checkpoint) make it high by their share: up to 1.5x in the CPU dry run, where the
            # killed attempt had read the whole phase; a few % on the GPU, whose phase is ~15x its read-ahead.
            per_sample = spent / trained[index] if spent is not None and trained[index] else None
            extra = {"data_cores": busy, "data_cores_per_1k_samples_s": round(busy / sps * 1e3, 3)
                     if busy is not None and sps else None,
                     "data_cpu_s": None if spent is None else round(spent, 1),
                     "data_cores_from_cpu_s": round(per_sample * sps, 2) if per_sample is not None and sps else None}
        print(json.dumps({"e2e": "phase", "job": args.label, "status": status, **row, "peak_tflops": peak / 1e12,
                          "peak_of": source, **extra}), flush=True)
    return 0


def _data_cores_by_phase(uri: str, run_id: str, n_phases: int,
                         cpu_log: str | None) -> list[tuple[float | None, float | None]]:
    """Per phase, (the cores Ray Data's tasks kept busy over its steady logging windows, ``data_cores``; the data
    CPU-seconds spent for it over the whole run, ``phase_data_cpu``)."""
    if not cpu_log:
        return [(None, None)] * n_phases
    from reclip_ray import tracking

    with open(cpu_log) as f:
        samples = [json.loads(line) for line in f if line.startswith("{")]
    client = tracking.client(uri)
    phase_of = {m.step: int(m.value) for m in client.get_metric_history(run_id, "phase")}
    logged: dict[int, list[float]] = {}
    for m in sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.timestamp):
        if m.step in phase_of:
            logged.setdefault(phase_of[m.step], []).append(m.timestamp / 1e3)
    # The first window of each phase (its start) is dropped, as in phase_rows: windows run from the first logging time.
    whole = phase_data_cpu(logged, samples)
    return [(data_cores(steady_windows(logged.get(i, [])), samples), whole.get(i)) for i in range(n_phases)]


def peak_flops(given: float) -> tuple[float, str]:
    """One GPU's dense bf16 FLOP/s for the MFU column, and whose it is: ``--peak-flops``, else the data sheet's
    peak of the GPU torch sees (``plan.device_gpu_peak``), else the H200's, marked as assumed (the CPU dry run,
    or a GPU the table lacks)."""
    import torch

    from reclip_ray.plan import GPU_PEAKS, device_gpu_peak

    if given:
        return given, "--peak-flops"
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    known = device_gpu_peak(name) if torch.cuda.is_available() else None
    if known is None:
        return GPU_PEAKS["h200"].tflops * 1e12, f"{GPU_PEAKS['h200'].name}, assumed ({name})"
    return known.tflops * 1e12, f"{known.name} ({name})"


def open_clip_check(args: argparse.Namespace) -> int:
    """open_clip loads the export (``local-dir:``) and embeds as the run's own model does (max abs difference).

    open_clip is not in the carried wheel set (64 MiB; gpu_wheels.py): where it is missing, the export's files are
    checked to load as safetensors into the run's model shapes instead, and tests/test_openclip.py covers open_clip
    loading a vit-b-16 export on CPU (the load does not depend on where the weights were trained)."""
    import torch

    import reclip_ray

    try:
        import open_clip
    except ImportError:
        from safetensors.torch import load_file

        from reclip_ray.openclip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

        state = load_file(os.path.join(args.open_clip_dir, OPEN_CLIP_WEIGHTS))
        config = json.load(open(os.path.join(args.open_clip_dir, OPEN_CLIP_CONFIG)))
        ours, _ = reclip_ray.load_model(args.model_dir)
        ok = sum(t.numel() for t in state.values()) >= sum(p.numel() for p in ours.parameters()) * 0.99 and all(
            torch.isfinite(t.float()).all() for t in state.values())
        print(json.dumps({"e2e": "open_clip_load", "open_clip_installed": False, "tensors": len(state),
                          "config_keys": sorted(config), "ok": bool(ok)}), flush=True)
        return 0 if ok else 1

    ours, tok = reclip_ray.load_model(args.model_dir)
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{args.open_clip_dir}")
    ours.eval(), oc.eval()
    size = oc.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = torch.from_numpy(tok.encode(["a red star on the left", "a large blue circle"], 16))
    padded = torch.nn.functional.pad(tokens, (0, oc.context_length - tokens.shape[1]), value=tok.pad_id)
    with torch.no_grad():
        d_img = (ours.encode_image(images) - oc.encode_image(images, normalize=True)).abs().max().item()
        d_txt = (ours.encode_text(tokens) - oc.encode_text(padded, normalize=True)).abs().max().item()
    ok = d_img < 1e-3 and d_txt < 1e-3
    print(json.dumps({"e2e": "open_clip_load", "image_size": size, "max_abs_diff_image": d_img,
                      "max_abs_diff_text": d_txt, "ok": ok}), flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--train", type=int, required=True)
    d.add_argument("--eval", type=int, required=True)
    d.add_argument("--size", type=int, required=True)
    d.add_argument("--shrink", default="")
    d.set_defaults(func=make_data)
    w = sub.add_parser("wait-checkpoint")
    w.add_argument("run_dir")
    w.add_argument("--timeout", type=float, required=True)
    w.add_argument("--pid", type=int, default=0, help="stop waiting once this process has exited")
    w.set_defaults(func=wait_checkpoint)
    s = sub.add_parser("phases")
    s.add_argument("--tracking-uri", required=True)
    s.add_argument("--experiment", required=True)
    s.add_argument("--label", required=True)
    s.add_argument("--peak-flops", type=float, default=0.0,
                   help="FLOP/s of one GPU (default: the data sheet's for the GPU torch sees)")
    s.add_argument("--config", required=True)
    s.add_argument("--set", action="append", default=[])
    s.add_argument("--cpu-log", default=None, help="the cpu-sample log of the job's run: adds data_cores per phase")
    s.set_defaults(func=phases)
    s = sub.add_parser("cpu-sample")
    s.add_argument("out")
    s.add_argument("--interval", type=float, default=0.25)
    s.set_defaults(func=cpu_sample)
    o = sub.add_parser("open-clip-check")
    o.add_argument("open_clip_dir")
    o.add_argument("model_dir")
    o.set_defaults(func=open_clip_check)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
