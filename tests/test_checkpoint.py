"""Training checkpoints: round trip, interrupted saves refused, pickled code never run."""

from __future__ import annotations

import pickle

import pytest
import torch

from reclip_ray.errors import CheckpointError
from reclip_ray.train.checkpoint import (CONFIG_FILE, META_FILE, STATE_FILE, TrainState, load_checkpoint,
                                         save_checkpoint)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file if ever unpickled


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_round_trip_restores_weights_optimizer_and_position(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    # README (Outputs): a checkpoint holds the schedule and data position, the restart count, the MLflow run id and
    # the config, besides the model and optimizer
    from reclip_ray.data.feed import DataPosition

    position = DataPosition(phase=1, frontier=40, units=[44, 45, 50], done=[3, 9], done_units=[41, 41])
    data = position.to_dict()
    state = TrainState(samples=640, step=10, phase=1, phase_done=True, restarts=2, mlflow_run_id="abc", gflops=1.5,
                       loss=2.25, rows_seen=700, rows_bad=3, rows_absent=5, data=data)
    save_checkpoint(tmp_path, model, opt, state, "name: x\n")
    assert (tmp_path / CONFIG_FILE).read_text() == "name: x\n"

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    got = load_checkpoint(tmp_path, fresh, fresh_opt)
    assert got == state and DataPosition.from_dict(got.data) == position
    torch.testing.assert_close(fresh.weight, model.weight)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_interrupted_save_is_refused(tmp_path):
    save_checkpoint(tmp_path, _model(), torch.optim.SGD(_model().parameters(), lr=0.1), TrainState(), "")
    (tmp_path / META_FILE).unlink()  # meta.json is written last: without it the save did not finish
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path, _model())


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    save_checkpoint(tmp_path, _model(), torch.optim.SGD(_model().parameters(), lr=0.1), TrainState(), "")
    marker = tmp_path / "pwned"
    with open(tmp_path / STATE_FILE, "wb") as f:
        pickle.dump({"model": _Evil(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(tmp_path, _model())
    assert not marker.exists()


def test_a_truncated_state_file_is_named_where_the_checkpoint_lives_not_in_its_local_copy(tmp_path):
    """A restart reads a local copy of a checkpoint on object storage (``scratch.downloaded``), removed before the
    user reads the error: the error names the checkpoint in the run folder."""
    save_checkpoint(tmp_path, _model(), torch.optim.SGD(_model().parameters(), lr=0.1), TrainState(), "")
    data = (tmp_path / STATE_FILE).read_bytes()
    (tmp_path / STATE_FILE).write_bytes(data[: len(data) // 2])
    where = "s3://bucket/runs/r/checkpoint_2026-12-06_07-00-00.000000"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path, _model(), source=where + "/")
    assert str(caught.value).startswith(f"{where}/{STATE_FILE}: refused to load (RuntimeError: ")
    assert str(tmp_path) not in str(caught.value)
    (tmp_path / META_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"^{where}: no {META_FILE}; the checkpoint is incomplete"):
        load_checkpoint(tmp_path, _model(), source=where)


@pytest.mark.filterwarnings("ignore:for (weight|bias). copying from a non-meta parameter")  # meta: no data to copy
def test_a_restore_leaves_adamws_step_counters_on_the_host_whatever_the_models_device(tmp_path):
    """On a GPU, AdamW (not fused, not capturable) reads every step counter back to the host twice a step; counters
    restored onto the GPU would make each of those a wait for the GPU. The model here lives on the meta device, a
    stand-in for a GPU that CPU-only CI has: the moments follow the parameters there, the counters stay on the CPU."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, opt, TrainState(step=1), "name: x\n")

    elsewhere = torch.nn.Linear(4, 3, device="meta")
    elsewhere_opt = torch.optim.AdamW(elsewhere.parameters(), lr=1e-2)
    load_checkpoint(tmp_path, elsewhere, elsewhere_opt)
    for p in elsewhere.parameters():
        state = elsewhere_opt.state[p]
        assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu" and state["step"].item() == 1


def _built(overrides: list[str]):
    """The worker's model and optimizer for the tiny preset with ``overrides`` (``Worker._build_model``)."""
    from reclip_ray.config import load_config
    from reclip_ray.model import build_model
    from reclip_ray.schedule import build_optimizer

    cfg = load_config("tiny", overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, vocab_size=64)
    return cfg, model, build_optimizer(model, cfg.optim)


def _one_step(model, optimizer) -> None:
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(1, 64, (2, 16))
    image, text = model.encode_image(images), model.encode_text(tokens)
    (image.sum() + text.sum()).backward()
    optimizer.step()


def test_a_relaunch_with_other_optimizer_settings_trains_with_them_and_keeps_the_moments(tmp_path):
    """``Optimizer.load_state_dict`` puts the saved group settings back: a relaunch with another
    ``optim.weight_decay``, ``betas`` or ``eps`` trained on with the first launch's (while its config.yaml, and
    every later checkpoint's, said otherwise). The restore keeps the saved moments and this launch's settings."""
    cfg, model, opt = _built(["optim.weight_decay=0.1", "optim.betas=[0.9,0.98]", "optim.eps=1e-6"])
    _one_step(model, opt)
    save_checkpoint(tmp_path, model, opt, TrainState(step=1), cfg.to_yaml())

    cfg2, model2, opt2 = _built(["optim.weight_decay=0.0", "optim.betas=[0.9,0.95]", "optim.eps=1e-8"])
    load_checkpoint(tmp_path, model2, opt2, config=cfg2)
    settings = {(g["weight_decay"], tuple(g["betas"]), g["eps"]) for g in opt2.param_groups}
    assert settings == {(0.0, (0.9, 0.95), 1e-8)}
    saved, restored = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sorted(saved) == sorted(restored)
    for index, moments in saved.items():
        assert torch.equal(restored[index]["exp_avg_sq"], moments["exp_avg_sq"]), index


@pytest.mark.parametrize("change, line", [
    (["model.text.context_length=77"], "model.text.context_length=32, this launch has model.text.context_length=77"),
    (["train.loss=siglip"], "train.loss=clip, this launch has train.loss=siglip"),
])
def test_a_checkpoint_that_does_not_fit_the_model_names_the_changed_keys(tmp_path, change, line):
    """A relaunch with another model shape (a longer text context for the finetune, as CLIPA does) or loss (SigLIP
    adds a bias) failed with torch's "Error(s) in loading state_dict for CLIP" as a plain RuntimeError: not a
    ReclipError, so Ray Train restarted the group ``run.max_failures`` times, reloading the checkpoint each time."""
    cfg, model, opt = _built(["model.text.context_length=32"])
    save_checkpoint(tmp_path, model, opt, TrainState(step=1), cfg.to_yaml())
    cfg2, model2, opt2 = _built(["model.text.context_length=32", *change])
    where = "s3://bucket/runs/r/checkpoint_000001"
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(tmp_path, model2, opt2, source=where, config=cfg2)
    rerun = change[0].split("=")[0] + "=" + line.split("=")[1].split(",")[0]
    assert str(caught.value) == (f"{where} was made with {line}: its weights do not fit; rerun with --set {rerun} "
                                 f"(or a new run.name)")
    with pytest.raises(CheckpointError, match=rf"^{where}: the checkpoint does not fit this launch's model \("
                                              r"RuntimeError: Error\(s\) in loading state_dict"):
        load_checkpoint(tmp_path, model2, opt2, source=where)  # no config to compare: torch's first line


def test_only_tensors_that_do_not_fit_are_a_checkpoint_error(tmp_path, monkeypatch):
    """A CUDA error or an out-of-memory while restoring is a RuntimeError too, but not the checkpoint's fault: it
    stays what it is, so that Ray Train retries it; optimizer groups that differ are the checkpoint's."""
    cfg, model, opt = _built([])
    save_checkpoint(tmp_path, model, opt, TrainState(step=1), cfg.to_yaml())
    other = torch.optim.AdamW(model.parameters())  # one group where the run's optimizer has two
    with pytest.raises(CheckpointError, match=r"does not fit this launch's model \(ValueError: loaded state dict "
                                              r"has a different number of parameter groups\)"):
        load_checkpoint(tmp_path, model, other, config=cfg)

    def cuda_fault(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "load_state_dict", cuda_fault)
    with pytest.raises(torch.OutOfMemoryError):
        load_checkpoint(tmp_path, model, opt, config=cfg)
