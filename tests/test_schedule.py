"""Phase plan and LR schedule against hand-computed values; AdamW parameter groups."""

from __future__ import annotations

import math

import pytest

from reclip_ray.config import ConfigError, from_dict
from reclip_ray.schedule import Schedule, build_optimizer


def _cfg(schedule="global", phases=None, **optim):
    """The finetune has its own peak and warmup in the per-phase schedule; the global one refuses them."""
    own = {"lr": 2e-4, "warmup_samples": 0.1} if schedule == "per_phase" else {}
    phases = phases or [
        {"name": "low", "image_size": 32, "text_length": 16, "samples": 0.8},
        {"name": "full", "image_size": 64, "text_length": 32, "samples": 0.2, "batch_size": 30, **own},
    ]
    return from_dict({
        "model": "tiny",
        "phases": phases,
        "train": {"samples": 1000, "batch_size": 64},
        "optim": {"lr": 1e-3, "warmup_samples": 100, "schedule": schedule, "min_lr_ratio": 0.1, **optim},
    })


def test_phase_plan_boundaries_batches_and_steps():
    s = Schedule.from_config(_cfg())
    low, full = s.phases
    assert (low.start_sample, low.end_sample, low.batch_size, low.steps) == (0, 800, 64, 13)  # ceil(800/64)
    assert (full.start_sample, full.end_sample, full.batch_size, full.steps) == (800, 1000, 30, 7)
    assert s.total_steps == 20
    assert s.phase_at(0) is low and s.phase_at(799) is low
    assert s.phase_at(800) is full and s.phase_at(5000) is full
    assert low.batch_at(768) == 32 and low.batch_at(0) == 64
    assert (low.image_size, full.text_length) == (32, 32)


def test_fraction_and_absolute_counts_agree():
    frac = Schedule.from_config(_cfg())
    count = Schedule.from_config(_cfg(phases=[
        {"name": "low", "image_size": 32, "text_length": 16, "samples": 800},
        {"name": "full", "image_size": 64, "text_length": 32, "samples": 200, "batch_size": 30},
    ]))
    assert [(p.start_sample, p.end_sample) for p in frac.phases] == [(p.start_sample, p.end_sample) for p in count.phases]
    for x in (0, 50, 400, 850, 999):
        assert frac.lr_at(x) == count.lr_at(x)


def test_schedule_total_is_train_samples_when_fractions_do_not_add_up_exactly():
    phases = [{"name": n, "image_size": 32, "text_length": 16, "samples": 0.3333333} for n in ("a", "b", "c")]
    cfg = _cfg(phases=phases)
    s = Schedule.from_config(cfg)
    assert [p.samples for p in s.phases] == cfg.phase_samples() == [333, 333, 334]
    assert s.total_samples == cfg.train.samples == 1000  # the driver compares the samples reached with this
    assert [p.start_sample for p in s.phases[1:]] == [p.end_sample for p in s.phases[:-1]]
    assert s.total_steps == 6 + 6 + 6


def test_global_warmup_then_cosine():
    s = Schedule.from_config(_cfg("global"))
    peak, floor = 1e-3, 1e-4
    assert s.lr_at(0) == pytest.approx(peak * 1 / 100)
    assert s.lr_at(49) == pytest.approx(peak * 50 / 100)
    assert s.lr_at(100) == pytest.approx(peak)  # cosine starts at the peak
    assert s.lr_at(550) == pytest.approx(floor + (peak - floor) * 0.5)  # halfway through 900 decay samples
    assert s.lr_at(325) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_at(1000) == pytest.approx(floor)
    assert s.lr_at(800) < s.lr_at(700)  # no restart at the phase boundary in global mode


@pytest.mark.parametrize("key, value, planned", [("lr", 2e-4, ("peak_lr", 2e-4)),
                                                 ("warmup_samples", 0.1, ("warmup_samples", 20)),
                                                 ("warmup_samples", 0, ("warmup_samples", 0))])
def test_global_schedule_refuses_a_phase_lr_or_warmup_it_would_ignore(key, value, planned):
    """The global schedule reads optim.lr and optim.warmup_samples only: a phase's own would be trained without."""
    phases = [{"name": "low", "image_size": 32, "text_length": 16, "samples": 0.8},
              {"name": "full", "image_size": 64, "text_length": 32, "samples": 0.2, key: value}]
    with pytest.raises(ConfigError) as err:
        _cfg("global", phases=phases)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"'phases.1.{key}' (full) = {value!r}")
    default = {"lr": "0", "warmup_samples": "-1"}[key]
    assert message.endswith(f"set optim.schedule=per_phase, or phases.1.{key}={default} (the run's)")
    # Both ways out are --set overrides that load (a preset sets both keys: "remove" is not one a --set can do).
    raw = {"model": "tiny", "phases": phases, "train": {"samples": 1000, "batch_size": 64},
           "optim": {"lr": 1e-3, "warmup_samples": 100, "schedule": "global"}}
    from reclip_ray.config import apply_overrides

    from_dict(apply_overrides(raw, [f"phases.1.{key}={default}"]))
    from_dict(apply_overrides(raw, ["optim.schedule=per_phase"]))
    # A config a run saved under the older rule (beside its model or checkpoint) still loads: no model unloadable.
    assert from_dict(raw, saved=True).phases[1].name == "full"
    full = Schedule.from_config(_cfg("per_phase", phases=phases)).phases[1]  # the per-phase schedule takes them
    assert getattr(full, planned[0]) == planned[1]
    defaults = [dict(p, lr=0.0, warmup_samples=-1) for p in phases]  # the defaults: nothing to ignore
    assert Schedule.from_config(_cfg("global", phases=defaults)).phases[1].peak_lr == 1e-3


def test_global_warmup_fraction_of_run():
    s = Schedule.from_config(_cfg("global", warmup_samples=0.1))
    assert s.global_warmup == 100
    assert s.lr_at(99) == pytest.approx(1e-3)


def test_per_phase_peaks_warmups_and_decay():
    s = Schedule.from_config(_cfg("per_phase"))
    low, full = s.phases
    assert (low.peak_lr, low.warmup_samples) == (1e-3, 100)  # -1 -> optim.warmup_samples (a count)
    assert (full.peak_lr, full.warmup_samples) == (2e-4, 20)  # 0.1 of the 200-sample phase
    assert s.lr_at(799) == pytest.approx(1e-4, rel=1e-3)  # decayed to min_lr_ratio * peak at the phase end
    assert s.lr_at(800) == pytest.approx(2e-4 * 1 / 20)  # restart: the finetune's own warmup
    assert s.lr_at(819) == pytest.approx(2e-4)
    # cosine of the finetune: 180 decay samples, halfway at 820 + 90
    assert s.lr_at(910) == pytest.approx(2e-5 + (2e-4 - 2e-5) * 0.5)
    assert s.lr_at(1000) == pytest.approx(2e-5)


def test_per_phase_fraction_of_optim_warmup_is_per_phase():
    s = Schedule.from_config(_cfg("per_phase", warmup_samples=0.05))
    assert [p.warmup_samples for p in s.phases] == [40, 20]  # 0.05 * 800; the finetune keeps its own 0.1


def test_no_decay_groups():
    from reclip_ray.model import build_model

    cfg = _cfg()
    model = build_model(cfg.model, vocab_size=64)
    opt = build_optimizer(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == cfg.optim.weight_decay and opt.param_groups[1]["weight_decay"] == 0
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    for n in ("logit_scale", "visual.pos_embed", "visual.cls_token", "text.token_embedding.weight",
              "text.positional_embedding", "text.ln_final.weight", "visual.blocks.0.attn.qkv.bias",
              "visual.norm.weight"):
        assert n in no_decay, n
    for n in ("visual.blocks.0.attn.qkv.weight", "text.blocks.0.mlp.0.weight", "image_projection.weight",
              "text_projection.weight", "visual.patch_embed.proj.weight"):
        assert n in decay, n
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
