"""Training checkpoints: round trip, interrupted saves refused, pickled code never run."""

from __future__ import annotations

import pickle

import pytest
import torch

from reclip_ray.errors import CheckpointError
from reclip_ray.train.checkpoint import META_FILE, STATE_FILE, TrainState, load_checkpoint, save_checkpoint


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
    state = TrainState(samples=640, step=10, phase=1, phase_done=True, restarts=2, mlflow_run_id="abc", gflops=1.5,
                       loss=2.25)
    save_checkpoint(tmp_path, model, opt, state, "name: x\n")

    fresh = torch.nn.Linear(4, 3)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    got = load_checkpoint(tmp_path, fresh, fresh_opt)
    assert got == state
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
