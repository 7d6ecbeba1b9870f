"""`reclip-ray plan`: the cost of a run from its config alone (no Ray, no data, no torch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from reclip_ray.cli import main
from reclip_ray.config import from_dict, load_config
from reclip_ray.errors import ReclipError
from reclip_ray.flops import phase_global_batch, run_flops, train_flops_per_sample
from reclip_ray.plan import (DEFAULT_DECODE_RATES, _duration, decode_rate_at, format_plan, load_decode_rates, make_plan,
                             phase_checkpoints)

H100_PEAK = 989e12  # dense BF16, FLOP/s


@pytest.mark.parametrize("preset", ["tiny", "vit-b-16"])
def test_phase_gflops_equal_flops_module(preset):
    cfg = load_config(preset)
    plan = make_plan(cfg)
    ref = run_flops(cfg)
    assert [p.name for p in plan.phases] == [p["name"] for p in ref["phases"]]
    for i, (mine, theirs, ph) in enumerate(zip(plan.phases, ref["phases"], cfg.phases)):
        assert mine.train_gflops == pytest.approx(theirs["train_gflops"], rel=1e-12)
        batch = phase_global_batch(cfg, i)
        assert mine.train_gflops_per_sample == train_flops_per_sample(cfg.model, ph.image_size, ph.text_length,
                                                                      batch) / 1e9
        assert mine.samples == theirs["samples"]
    assert plan.total_train_gflops == pytest.approx(ref["total_train_gflops"], rel=1e-12)
    assert sum(p.share for p in plan.phases) == pytest.approx(1.0)


def _hand_config():
    """Patch 8, vision width 64 x 1 block, text width 32 x 1 block, embed 16; 30 samples at 16 px, 10 at 32 px."""
    return from_dict({
        "name": "hand",
        "model": {"embed_dim": 16,
                  "vision": {"patch_size": 8, "width": 64, "depth": 1, "heads": 1, "base_image_size": 32},
                  "text": {"width": 32, "depth": 1, "heads": 1, "context_length": 16}},
        "phases": [{"name": "low", "image_size": 16, "text_length": 4, "samples": 30},
                   {"name": "full", "image_size": 32, "text_length": 8, "samples": 10}],
        "train": {"samples": 40, "batch_size": 4},
    })


def _block(L: int, D: int) -> int:
    """One transformer block, multiply-add = 2 FLOPs, MLP hidden 4D, all heads together (flops.py's convention)."""
    qkv = 2 * L * D * (3 * D)
    scores = 2 * L * L * D  # q @ k^T
    mix = 2 * L * L * D  # softmax(scores) @ v
    proj = 2 * L * D * D
    mlp = 2 * L * D * (4 * D) + 2 * L * (4 * D) * D
    return qkv + scores + mix + proj + mlp


def _hand_image(px: int) -> int:
    patches = (px // 8) ** 2
    patch_embed = 2 * patches * (3 * 8 * 8) * 64  # the 8x8 conv over 3 channels is a matmul per patch
    return patch_embed + _block(patches + 1, 64) + 2 * 64 * 16  # + cls token; + projection to embed 16


def _hand_text(length: int) -> int:
    return _block(length, 32) + 2 * 32 * 16


def test_hand_computed_total_and_savings():
    plan = make_plan(_hand_config())
    logits = 2 * 4 * 16  # per sample: one row of the batch-4 x batch-4 logits over embed 16
    train = lambda px, n: 3 * (_hand_image(px) + _hand_text(n) + logits)  # noqa: E731  training = 3x forward
    expected = 30 * train(16, 4) + 10 * train(32, 8)
    full = 40 * train(32, 8)
    assert [p.image_tokens for p in plan.phases] == [(16 // 8) ** 2 + 1, (32 // 8) ** 2 + 1]
    assert plan.total_train_gflops * 1e9 == pytest.approx(expected, rel=1e-12)
    assert plan.full_resolution["train_gflops"] * 1e9 == pytest.approx(full, rel=1e-12)
    assert plan.saving_total == pytest.approx(full / expected, rel=1e-12)
    image_saving = 40 * _hand_image(32) / (30 * _hand_image(16) + 10 * _hand_image(32))
    assert plan.saving_image_tower == pytest.approx(image_saving, rel=1e-12)


@pytest.mark.parametrize("preset", ["tiny", "vit-b-16"])
def test_saving_is_full_over_total(preset):
    plan = make_plan(load_config(preset))
    assert plan.saving_total == pytest.approx(plan.full_resolution["train_gflops"] / plan.total_train_gflops)
    assert plan.saving_total > 1 and plan.saving_image_tower > 1


def test_a_sweep_trial_without_its_finetune_is_planned_against_the_full_runs_baseline():
    """A trial with finetune_fraction 0 trains only the 32 px / 16-token phase but is scored at the full run's 64 px
    and 32 tokens (``eval.full_image_size`` / ``full_text_length``): its baseline is that full resolution, the same
    as the full run's at the same samples, not its own phase (which gave a saving of exactly 1)."""
    from reclip_ray.config import apply_overrides, from_dict, load_raw
    from reclip_ray.sweep import trial_raw

    alone = from_dict(trial_raw(load_raw("tiny"), {"finetune_fraction": 0.0}, {"samples": 1000}))
    full = from_dict(apply_overrides(load_raw("tiny"), [f"train.samples={alone.train.samples}"]))
    assert [p.image_size for p in alone.phases] == [32]
    planned, reference = make_plan(alone), make_plan(full)
    assert planned.full_resolution == reference.full_resolution
    assert (planned.full_resolution["image_size"], planned.full_resolution["text_length"]) == (64, 32)
    assert planned.saving_total > 3 and planned.saving_image_tower > 3  # every sample at 32 px / 16 tokens


def test_wall_time_8_h100_at_mfu_04():
    plan = make_plan(load_config("vit-b-16"), gpus=8, gpu="h100", mfu=0.4)
    for p in plan.phases:
        assert p.wall_s == pytest.approx(p.train_gflops * 1e9 / (8 * H100_PEAK * 0.4), rel=1e-12)
        assert p.samples_per_s_per_gpu == pytest.approx(p.samples / p.wall_s / 8)
        assert p.decode_cores_per_gpu == pytest.approx(p.samples_per_s_per_gpu / DEFAULT_DECODE_RATES[p.image_size])
    assert plan.wall_s == pytest.approx(plan.total_train_gflops * 1e9 / (8 * H100_PEAK * 0.4), rel=1e-12)
    assert plan.gpu_hours == pytest.approx(plan.wall_s * 8 / 3600)
    assert plan.hardware.peak_tflops == 989.0
    a100 = make_plan(load_config("vit-b-16"), gpus=8, gpu="A100", mfu=0.4)
    assert a100.wall_s == pytest.approx(plan.wall_s * 989 / 312)


def _bench_lines(rates: dict[int, float]) -> str:
    """What `reclip-ray bench data` prints: a project row, a baseline row and a speedup row per size."""
    rows = []
    for px, rate in rates.items():
        rows.append({"bench": "data_decode", "path": "reclip (draft + box resize)", "target_px": px,
                     "source_px": 512, "source_kb": 54.0, "images_per_s_per_core": rate})
        rows.append({"bench": "data_decode", "path": "baseline (full decode + resize)", "target_px": px,
                     "source_px": 512, "source_kb": 54.0, "images_per_s_per_core": rate / 4})
        rows.append({"bench": "data_decode", "target_px": px, "speedup": 4.0})
    return "\n".join(json.dumps(r) for r in rows) + "\n"


def test_decode_rates_file_and_nearest_larger_size(tmp_path):
    path = tmp_path / "rates.jsonl"
    path.write_text(_bench_lines({32: 3000.0, 96: 1500.0, 128: 1200.0}))
    assert load_decode_rates(path) == {32: 3000.0, 96: 1500.0, 128: 1200.0}
    assert decode_rate_at({32: 3000.0, 96: 1500.0}, 64) == (1500.0, 96)  # next larger measured size
    assert decode_rate_at({32: 3000.0, 96: 1500.0}, 224) == (1500.0, 96)  # above all: the largest
    cfg = load_config("tiny", ["phases.1.image_size=64"])  # 32 px measured, 64 px not
    plan = make_plan(cfg, gpus=2, gpu="h100", decode_rates=str(path))
    assert [(p.decode_rate_per_core, p.decode_rate_px) for p in plan.phases] == [(3000.0, 32), (1500.0, 96)]
    assert any("no decode rate measured at 64 px; used 96 px" in n for n in plan.notes)
    assert "note: phase 'finetune'" in format_plan(plan)


def test_bad_decode_rates_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"bench": "data_decode"}\nnot json\n')
    with pytest.raises(ReclipError, match=r"bad.jsonl:2 is not a JSON line"):
        load_decode_rates(bad)
    bad.write_text(json.dumps({"bench": "data_decode", "target_px": 64, "speedup": 3.0}) + "\n")
    with pytest.raises(ReclipError, match="no 'reclip' rows"):
        load_decode_rates(bad)
    with pytest.raises(ReclipError, match="cannot read"):
        load_decode_rates(tmp_path / "missing.jsonl")


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_json_has_the_numbers_of_the_table(capsys):
    args = ("plan", "--config", "vit-b-16", "--gpus", "64", "--gpu", "h100")
    rc, table, _ = _run_cli(capsys, *args)
    assert rc == 0
    rc, text, _ = _run_cli(capsys, *args, "--json")
    assert rc == 0
    data = json.loads(text)
    lines = table.splitlines()
    for p in data["phases"]:
        flops_row, hw_row = [line.split() for line in lines if line.startswith(p["name"] + " ")]
        assert int(flops_row[1].replace(",", "")) == p["samples"]
        assert [int(v) for v in flops_row[2:5]] == [p["image_size"], p["image_tokens"], p["text_length"]]
        assert float(flops_row[5]) == pytest.approx(p["train_gflops_per_sample"], abs=5e-4)
        assert float(flops_row[6]) == pytest.approx(p["train_gflops"], rel=1e-4)
        assert float(flops_row[7].rstrip("%")) / 100 == pytest.approx(p["share"], abs=5e-4)
        assert float(hw_row[3].replace(",", "")) == pytest.approx(p["samples_per_s_per_gpu"], abs=0.5)
        assert float(hw_row[-9]) == pytest.approx(p["decode_cores_per_gpu"], abs=0.05)
        assert hw_row[-10] == f"({p['decode_rate_px']})"
        every = p["checkpoint_every_s"]  # "49 s", "6.6 min" or "phase end"
        assert " ".join(hw_row[-8:-6]) == ("phase end" if every is None else _duration(every))
        assert hw_row[-5] == "ms" and float(hw_row[-6]) == pytest.approx(1000 * p["step_s"], abs=0.5)
        assert hw_row[-3] == "GB/s" and float(hw_row[-4]) == pytest.approx(p["allreduce_busbw_gbs"], abs=0.05)
        assert hw_row[-1] == "GB" and float(hw_row[-2]) == pytest.approx(p["gpu_memory_gb"], abs=0.05)
    total = next(line for line in lines if line.startswith("total ") and "e+" in line).split()
    assert float(total[2]) == pytest.approx(data["total_train_gflops"], rel=1e-4)
    saving = re.search(r"saving vs full resolution: ([\d.]+)x total, ([\d.]+)x image tower", table)
    assert float(saving[1]) == pytest.approx(data["saving_total"], abs=5e-3)
    assert float(saving[2]) == pytest.approx(data["saving_image_tower"], abs=5e-3)
    gpu_hours = re.search(r"^total .*\(([\d,.]+) GPU-hours\)", table, re.M)
    assert float(gpu_hours[1].replace(",", "")) == pytest.approx(data["gpu_hours"], abs=0.05)
    assert data["hardware"]["gpus"] == 64 and data["hardware"]["peak_tflops"] == 989.0


def _clean_env() -> dict[str, str]:
    """An unreachable RAY_ADDRESS: anything that tried to connect to Ray would hang or fail."""
    return {**os.environ, "RAY_ADDRESS": "127.0.0.1:1", "OMP_NUM_THREADS": "1"}


def test_cli_plan_touches_no_ray_and_no_files(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "reclip_ray", "plan", "--config", "vit-b-16", "--gpus", "64",
                           "--gpu", "h100"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 30
    assert "RECLIP saving vs full resolution" in proc.stdout and "decode cores/GPU" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_plan_imports_neither_ray_nor_torch(tmp_path):
    code = ("import sys; from reclip_ray.cli import main; rc = main(['plan', '--config', 'vit-b-16', '--gpus', '8', "
            "'--json']); heavy = sorted({'ray', 'torch', 'pyarrow'} & set(sys.modules)); "
            "print('HEAVY', heavy, file=sys.stderr); sys.exit(rc or bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["--gpus", "8", "--gpu", "v100"], "unknown --gpu 'v100'; known: a100, h100, h100-pcie, h200"),
    (["--gpu", "h100"], "add --gpus N"),
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "8", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--config", "no-such-preset"], "unknown config 'no-such-preset'"),
    (["--config", "tiny", "--set", "phases.0.image_size=33"], "not a positive multiple of the patch size"),
])
def test_mistakes_are_one_line_exit_2(capsys, argv, message):
    rc, out, err = _run_cli(capsys, "plan", *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("reclip-ray: error: ")


def test_tiny_plan_without_gpus_prints_a_hint(capsys):
    rc, out, _ = _run_cli(capsys, "plan")
    assert rc == 0
    assert "config tiny" in out and "add --gpus N" in out and "decode cores/GPU" not in out
    assert json.loads(json.dumps(make_plan(load_config("tiny")).to_dict()))["hardware"] is None


@pytest.mark.parametrize("device, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA L4", None),
])
def test_the_peak_of_the_gpu_torch_names(device, peak):
    """MFU on a lent GPU is taken against the peak of the board torch reports (benchmarks/gpu_e2e.py); a board the
    table lacks (an NVL, an L4) is None, not its SXM sibling's number."""
    from reclip_ray.plan import device_gpu_peak

    found = device_gpu_peak(device)
    assert (found.tflops if found else None) == peak


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", []), ("vit-b-16", []), ("tiny", ["train.loss=siglip", "model.vision.pool=avg", "model.vision.depth=3"])])
def test_the_parameter_count_is_the_built_models(preset, overrides):
    """The plan counts parameters without torch; the model torch builds from the same config has exactly as many
    (timm's ViT with ln_pre has no patch-embedding bias; siglip adds the logit bias)."""
    from reclip_ray.flops import model_parameters
    from reclip_ray.model import build_model

    cfg = load_config(preset, overrides)
    model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, eot_id=1, pad_id=0)
    assert model_parameters(cfg.model, cfg.data.vocab_size) == sum(p.numel() for p in model.parameters())
    assert make_plan(cfg).parameters == sum(p.numel() for p in model.parameters())


def test_a_checkpoints_bytes_are_what_the_trainer_writes(tmp_path):
    """The plan's bytes per checkpoint against a real one: the tiny model's state.pt after an AdamW step (its two
    moments exist only after a step), within 1%."""
    import torch

    from reclip_ray.model import build_model
    from reclip_ray.schedule import build_optimizer
    from reclip_ray.train.checkpoint import STATE_FILE, TrainState, save_checkpoint

    cfg = load_config("tiny")
    model = build_model(cfg.model, vocab_size=cfg.data.vocab_size, eot_id=1, pad_id=0)
    optimizer = build_optimizer(model, cfg.optim)
    sum(p.float().pow(2).sum() for p in model.parameters()).backward()
    optimizer.step()
    save_checkpoint(tmp_path, model, optimizer, TrainState(), "name: tiny\n")
    written = (tmp_path / STATE_FILE).stat().st_size
    assert make_plan(cfg).checkpoint_bytes == pytest.approx(written, rel=0.01), written
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["optimizer"]["state"]


@pytest.mark.parametrize("overrides", [
    [],  # tiny: every 16,000 samples, batch 128
    ["checkpoint.every_samples=0"],
    ["checkpoint.every_samples=100", "train.batch_size=128"],  # every step crosses one
    ["checkpoint.every_samples=128"],  # a multiple at each step's end
    ["checkpoint.every_samples=1000", "train.samples=10050"],  # the phases start off a multiple; a short last step
    ["checkpoint.every_samples=1000", "train.samples=10010", "scaling.max_workers=16"],  # the remainder joins a step
    ["checkpoint.every_samples=999999"],  # past the run
])
def test_the_checkpoints_per_phase_are_the_trainers(overrides):
    """``phase_checkpoints`` against the trainer's own rule walked step by step: ``Worker.run_phase`` checkpoints
    after a step that takes the count past a multiple of ``every_samples`` unless that step ends the phase
    (``end_phase`` writes the phase end's), with each step's rows from ``PhasePlan.batch_at``."""
    from reclip_ray.schedule import Schedule

    cfg = load_config("tiny", overrides)
    every = cfg.checkpoint.every_samples
    plan = make_plan(cfg)
    for phase, cost in zip(Schedule.from_config(cfg).phases, plan.phases):
        walked, samples = 1, phase.start_sample  # the phase end's
        while samples < phase.end_sample:
            prev, samples = samples, samples + phase.batch_at(samples)
            walked += bool(every and samples < phase.end_sample and samples // every > prev // every)
        assert phase_checkpoints(phase, every) == cost.checkpoints == walked, (overrides, phase)


FIX = "checkpoint.every_minutes=10 checkpoints about every 10.0 min on any number of GPUs"


def _fix(note: str) -> list[str]:
    """The overrides a checkpoint note suggests."""
    return re.search(r"; ((?:checkpoint\.\w+=\d+ )+)checkpoints about every", note)[1].split()


def test_checkpoints_seconds_apart_get_a_note_with_an_interval_to_use(capsys):
    """At 64 GPUs an earlier vit-b-16 preset (every 10M samples) checkpointed 1.8 GB every 4.9 s of its 64 px phase:
    the plan says so and what to set, a clock's interval, which the note's own overrides then meet on 8 GPUs and 64
    (no note). The preset (every 10 min) gets no note either."""
    cfg = load_config("vit-b-16", ["checkpoint.every_samples=10000000"])
    plan = make_plan(cfg, gpus=64, gpu="h200")
    lowres = plan.phases[0]
    assert lowres.checkpoints == 38 and lowres.checkpoint_every_s == pytest.approx(
        10_000_000 / (lowres.samples_per_s_per_gpu * 64))
    assert plan.checkpoint_bytes == 12 * plan.parameters and 1.7e9 < plan.checkpoint_bytes < 1.9e9
    (note,) = [n for n in plan.notes if n.startswith("phase 'lowres': a checkpoint every")]
    assert "(38 in 3.1 min, 1.80 GB each)" in note and note.endswith(f"checkpoint.every_samples=0 {FIX}"), note
    # What holds the other ranks: the preset's async upload leaves rank 0's write to local disk; sync adds the copy
    assert "rank 0 writes each to local disk while the other ranks wait (checkpoint.upload async" in note, note
    synced = make_plan(load_config("vit-b-16", ["checkpoint.every_samples=10000000", "checkpoint.upload=sync"]),
                       gpus=64, gpu="h200")
    (synced_note,) = [n for n in synced.notes if n.startswith("phase 'lowres': a checkpoint every")]
    assert "rank 0 writes and copies each while the other ranks wait" in synced_note, synced.notes
    assert (plan.to_dict()["checkpoint_upload"], synced.to_dict()["checkpoint_upload"]) == ("async", "sync")
    fixed = load_config("vit-b-16", ["checkpoint.every_samples=10000000", *_fix(note)])
    for gpus in (8, 64):
        on = make_plan(fixed, gpus=gpus, gpu="h200")
        assert not [n for n in on.notes if "checkpoint" in n], (gpus, on.notes)
        assert [p.checkpoint_every_s for p in on.phases if p.checkpoints > 1] == [600.0] * sum(
            p.checkpoints > 1 for p in on.phases)
    assert not [n for n in make_plan(load_config("vit-b-16"), gpus=8, gpu="h200").notes if "checkpoint" in n]
    rc, out, _ = _run_cli(capsys, "plan", "--config", "vit-b-16")
    assert rc == 0 and "checkpoints: 1.80 GB each (149,620,737 parameters" in out
    assert ("every 10 min and at each phase end: 1 in lowres, 1 in finetune, plus the clock's (--gpus estimates "
            "them)") in out


@pytest.mark.parametrize("preset", ["vit-b-16", "vit-l-16"])
@pytest.mark.parametrize("gpus", [8, 16, 64, 128])
def test_a_clocks_checkpoints_are_one_per_interval_of_each_phases_wall_time(preset, gpus):
    """The large presets checkpoint by the clock (every 10 min, no sample interval). The clock restarts at each
    checkpoint, a phase end's too, and a checkpoint waits for the next log window (every 10 steps), so a phase of
    ``w`` seconds whose log windows are ``d`` seconds apart writes between ``ceil(w / (600 + d))`` and
    ``ceil(w / 600)``, its end's included: bounds from the plan's wall time alone, around ``run_checkpoints``'
    step-by-step walk."""
    import math

    from reclip_ray.schedule import Schedule

    cfg = load_config(preset)
    assert (cfg.checkpoint.every_samples, cfg.checkpoint.every_minutes) == (0, 10)
    plan = make_plan(cfg, gpus=gpus, gpu="h200")
    for p, phase in zip(plan.phases, Schedule.from_config(cfg).phases):
        window_s = cfg.train.log_every_steps * phase.batch_size / (p.samples_per_s_per_gpu * gpus)
        assert math.ceil(p.wall_s / (600 + window_s)) <= p.checkpoints <= math.ceil(p.wall_s / 600), (p, window_s)
        assert p.checkpoint_every_s == (600.0 if p.checkpoints > 1 else None)
    assert [p.checkpoints for p in make_plan(cfg).phases] == [1, 1]  # no speed: the samples' only


def test_the_readmes_plan_is_what_the_command_prints(capsys):
    """README's example of `reclip-ray plan` is the command's output today, line for line."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = "$ reclip-ray plan --config vit-b-16 --gpus 64 --gpu h100\n"
    shown = readme[readme.index(command) + len(command):].split("```")[0]
    rc, out, _ = _run_cli(capsys, *command.split()[2:])
    assert rc == 0 and shown == out, shown


def test_a_phase_that_runs_long_between_checkpoints_gets_a_note():
    """vit-l-16 on its minimum 16 GPUs with an earlier preset's interval (200M samples): the 224 px finetune
    (100M samples) runs 101.6 min with only its end's checkpoint. The note's overrides (every 10 min) give it 10
    (each at the first log window 10 min after the last: 10 steps of ~2 s there);
    the 64 px phase's 20.7 min apart gets no note, nor does either phase on 128."""
    old = ["checkpoint.every_samples=200000000", "checkpoint.every_minutes=0"]
    on_16 = make_plan(load_config("vit-l-16", old), gpus=16, gpu="h200")
    finetune = on_16.phases[1]
    assert finetune.checkpoints == 1 and finetune.checkpoint_every_s is None and finetune.wall_s > 1800
    (note,) = [n for n in on_16.notes if "between checkpoints" in n]
    assert note.startswith(f"phase 'finetune': {_duration(finetune.wall_s)} between checkpoints on 16 GPUs")
    assert note.endswith(f"checkpoint.every_samples=0 {FIX}"), note
    fixed = make_plan(load_config("vit-l-16", [*old, *_fix(note)]), gpus=16, gpu="h200")
    assert fixed.phases[1].checkpoints == 10 and not [n for n in fixed.notes if "checkpoint" in n]
    assert not [n for n in make_plan(load_config("vit-l-16", old), gpus=128, gpu="h200").notes if "between" in n]


def _split_fix(note: str) -> list[str]:
    """The overrides a split note suggests."""
    return re.search(r"allows\); ((?:data\.\w+=\d+ )+)make its blocks", note)[1].split()


def test_a_phase_whose_blocks_would_outrun_its_split_coordinator_gets_a_note_whose_overrides_clear_it():
    """Every block of a phase passes through one split coordinator, ~0.9 ms of CPU each (BENCHMARKS.md): the plan
    prices each phase's blocks/s from its samples/s and ``run_names.block_rows`` (8 MiB of decoded rows: 682 at
    64 px, 64 at 224 px, 128 JPEGs with device decode), notes those over ``SPLIT_BLOCKS_PER_S``, and the overrides
    that one note gives (the run's keys, one value for all phases) clear every such note."""
    from reclip_ray.plan import SPLIT_BLOCKS_PER_S

    default = ["data.block_mb=8", "data.chunk_rows=64"]  # the config's defaults (the preset sets its own)
    cfg = load_config("vit-b-16", default)
    assert [p.block_rows for p in make_plan(cfg).phases] == [8 * 2**20 // (3 * 64 * 64), 64] == [682, 64]
    assert make_plan(cfg).phases[0].split_blocks_per_s is None  # no speed without --gpus
    assert [p.block_rows for p in make_plan(load_config("vit-b-16", default + ["data.decode_device=cuda"])).phases] \
        == [128, 128]
    assert not [n for n in make_plan(cfg, gpus=8, gpu="h100").notes if "split coordinator" in n]
    for gpus in (64, 128):
        plan = make_plan(cfg, gpus=gpus, gpu="h100")
        for p in plan.phases:
            assert p.split_blocks_per_s == pytest.approx(p.samples / p.wall_s / p.block_rows)
            assert p.split_blocks_per_s > SPLIT_BLOCKS_PER_S
        notes = [n for n in plan.notes if "split coordinator" in n]
        assert [n.split("'")[1] for n in notes] == ["lowres", "finetune"], plan.notes
        assert _split_fix(notes[0]) == _split_fix(notes[1])
        fixed = make_plan(load_config("vit-b-16", default + _split_fix(notes[0])), gpus=gpus, gpu="h100")
        assert not [n for n in fixed.notes if "split coordinator" in n], fixed.notes
        assert all(p.split_blocks_per_s <= SPLIT_BLOCKS_PER_S for p in fixed.phases)
        assert plan.to_dict()["phases"][0]["block_rows"] == 682


@pytest.mark.parametrize("preset", ["vit-b-16", "vit-l-16"])
def test_the_gpu_presets_blocks_stay_under_what_one_split_coordinator_serves_across_their_scaling_range(preset):
    """The presets' ``data.block_mb`` / ``data.chunk_rows`` are what the plan's note gives at their
    ``scaling.max_workers``: with the config's defaults (8 MB, 64) vit-b-16 on 64 H100s would send ~3,000 blocks/s
    through each phase's one coordinator, about 2.7x what one serves (BENCHMARKS.md)."""
    from reclip_ray.plan import SPLIT_BLOCKS_PER_S

    cfg = load_config(preset)
    for gpus in range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1):
        for gpu in ("h100", "h200"):
            plan = make_plan(cfg, gpus=gpus, gpu=gpu)
            assert all(p.split_blocks_per_s <= SPLIT_BLOCKS_PER_S for p in plan.phases), (gpus, gpu, plan.notes)
    top = make_plan(load_config(preset, ["data.block_mb=8", "data.chunk_rows=64"]), gpus=cfg.scaling.max_workers)
    notes = [n for n in top.notes if "split coordinator" in n]
    assert notes and _split_fix(notes[0]) == [f"data.block_mb={cfg.data.block_mb:g}",
                                              f"data.chunk_rows={cfg.data.chunk_rows}"], notes


def test_the_all_reduce_bandwidth_a_phase_needs_is_the_gradients_bytes_over_its_step():
    """Per phase, the bus bandwidth (nccl-tests' busbw) at which DDP's ring all-reduce of the gradients takes as long
    as the step at the priced speed: 2 (N - 1) / N x 4 bytes x parameters / (global batch / (N x samples/s/GPU)),
    half with ``train.grad_reduce=bf16``, none on one GPU; in the table and ``--json``."""
    cfg = load_config("vit-b-16")
    plan = make_plan(cfg, gpus=64, gpu="h100")
    for i, p in enumerate(plan.phases):
        step = phase_global_batch(cfg, i) / (64 * p.samples_per_s_per_gpu)
        assert p.step_s == pytest.approx(step)
        assert p.allreduce_busbw_gbs == pytest.approx(2 * 63 / 64 * 4 * plan.parameters / step / 1e9)
    # vit-b-16's 64 px phase: 16 ms steps of 512 rows per H100 at MFU 0.4, 0.6 GB of fp32 gradients
    assert plan.phases[0].step_s == pytest.approx(0.0162, abs=5e-4)
    assert 70 < plan.phases[0].allreduce_busbw_gbs < 75
    assert "16 ms        72.8 GB/s" in format_plan(plan)
    half = make_plan(load_config("vit-b-16", ["train.grad_reduce=bf16"]), gpus=64, gpu="h100")
    assert [p.allreduce_busbw_gbs for p in half.phases] == pytest.approx(
        [p.allreduce_busbw_gbs / 2 for p in plan.phases])
    assert half.to_dict()["grad_reduce"] == "bf16" and plan.to_dict()["phases"][0]["allreduce_busbw_gbs"] > 0
    one = make_plan(cfg, gpus=1, gpu="h100")
    assert [p.allreduce_busbw_gbs for p in one.phases] == [0.0, 0.0]
    rows = [line for line in format_plan(one).splitlines() if line.startswith(("lowres ", "finetune "))]
    assert len(rows) == 4 and all(re.search(r" - +[\d.]+ GB$", line) for line in rows[2:]), rows  # hardware rows


def test_a_phase_that_would_not_fit_a_gpus_memory_gets_a_note_with_a_micro_batch_that_fits():
    """Per phase, one GPU's memory in a step (``reclip_ray.memory``, within a few percent of an H200's measured
    peaks: tests/test_memory.py). vit-b-16's 224 px phase without its preset's micro-batch fits 80 GB on 64 GPUs
    (512 rows each) but not on 8 (4,096 rows); the note names that phase's key, and its micro-batch, applied, fits
    (no note; its GB figure is the plan's for it). A 141 GB H200 takes more rows than an 80 GB H100."""
    from reclip_ray.flops import model_parameters
    from reclip_ray.memory import step_gpu_bytes
    from reclip_ray.plan import MEMORY_NOTE_SHARE

    cfg = load_config("vit-b-16", ["phases.1.micro_batch_size=0"])
    plan = make_plan(cfg, gpus=64, gpu="h100")
    params = model_parameters(cfg.model, cfg.data.vocab_size)
    for i, p in enumerate(plan.phases):
        assert p.gpu_memory_gb * 1e9 == pytest.approx(step_gpu_bytes(
            cfg.model, params, p.image_size, p.text_length, rows=phase_global_batch(cfg, i) // 64,
            global_batch=phase_global_batch(cfg, i), local_loss=True))
    assert 35 < plan.phases[1].gpu_memory_gb < 45 and not [n for n in plan.notes if "per GPU in a step" in n]
    eight = make_plan(cfg, gpus=8, gpu="h100")
    (note,) = [n for n in eight.notes if "per GPU in a step" in n]
    assert note.startswith("phase 'finetune': ") and "(4,096 rows per worker)" in note, note
    assert 300 < eight.phases[1].gpu_memory_gb < 320  # README: "would need 309 GB on 8"
    fix = re.search(r"set (phases\.1\.micro_batch_size=(\d+))", note)
    assert int(fix[2]) % 8 == 0
    fixed = make_plan(load_config("vit-b-16", [fix[1]]), gpus=8, gpu="h100")
    assert not [n for n in fixed.notes if "per GPU in a step" in n], fixed.notes
    assert fixed.phases[1].gpu_memory_gb <= MEMORY_NOTE_SHARE * 80
    assert f"(exact accumulation: {fixed.phases[1].gpu_memory_gb:.2f} GB)" in note
    assert fixed.phases[0].gpu_memory_gb == eight.phases[0].gpu_memory_gb  # the other phase's rows are its own
    bigger = make_plan(cfg, gpus=8, gpu="h200").notes
    assert int(re.search(r"micro_batch_size=(\d+)", next(n for n in bigger if "per GPU" in n))[1]) > int(fix[2])


@pytest.mark.parametrize("preset", ["vit-b-16", "vit-l-16"])
def test_the_gpu_presets_fit_an_80_gb_gpu_at_every_worker_count_of_their_scaling_range(preset):
    """An elastic run may shrink to ``scaling.min_workers``, and each survivor's share of the global batch grows:
    the presets' per-phase micro-batches keep every phase under the note's share of an 80 GB H100 from min to max
    workers (vit-b-16's 224 px phase on 8 workers took ~309 GB before it had one)."""
    from reclip_ray.plan import MEMORY_NOTE_SHARE

    cfg = load_config(preset)
    for gpus in range(cfg.scaling.min_workers, cfg.scaling.max_workers + 1):
        plan = make_plan(cfg, gpus=gpus, gpu="h100")
        assert max(p.gpu_memory_gb for p in plan.phases) <= MEMORY_NOTE_SHARE * 80, (gpus, plan.notes)
    # ... and at max_workers no phase accumulates: the micro-batch costs nothing where the preset is meant to run
    assert all(phase_global_batch(cfg, i) // cfg.scaling.max_workers <= (ph.micro_batch_size
               if ph.micro_batch_size > 0 else 10**9) for i, ph in enumerate(cfg.phases))


def test_the_clip_tokenizer_is_priced_with_the_vocabulary_training_builds(tmp_path, monkeypatch):
    """``data.tokenizer: clip``: the plan counts the text embedding with CLIP's 49,408 tokens, not data.vocab_size,
    and so has exactly the parameters of the model the launch builds from the tokenizer it resolves."""
    pytest.importorskip("open_clip")
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.model import build_model
    from reclip_ray.train.prepare import ensure_tokenizer

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the conversion's cache, not the user's
    monkeypatch.chdir(tmp_path)  # no file named `clip` here
    cfg = load_config("tiny", ["data.tokenizer=clip"])
    tok = load_tokenizer(ensure_tokenizer(cfg, str(tmp_path / "run")))
    built = sum(p.numel() for p in build_model(cfg.model, tokenizer=tok).parameters())
    plan = make_plan(cfg)
    assert tok.vocab_size == 49408 != cfg.data.vocab_size
    assert plan.parameters == built
    assert not any("data.vocab_size" in note for note in plan.notes)
