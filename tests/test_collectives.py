"""The worker loop's own collectives (``train/collectives.py``, the log window's all-reduce) on a real gloo group of 2
processes, without Ray."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from gloo_ranks import join, leave, spawn


def _leave(rank: int, out: str, result) -> None:
    """Write this rank's result for the test to read, and leave the group."""
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    leave()


def _spawn(tmp_path, name: str, rank_main, world: int, *args) -> list:
    """Run ``rank_main(rank, world, init_file, out, *args)`` in ``world`` processes; every rank's result."""
    out = str(tmp_path / f"out-{name}")
    spawn(rank_main, world, world, str(tmp_path / f"init-{name}"), out, *args)
    return [json.loads(open(f"{out}.{r}").read()) for r in range(world)]


def _steps_worker(rank: int, world: int, init_file: str, out: str, steps: list[int]) -> None:
    from reclip_ray.train.collectives import gather, steps_on_every_rank, sum_over_ranks

    join(rank, world, init_file)
    cpu = torch.device("cpu")
    result = {"gather": gather({"rank": rank}, world), "sum": sum_over_ranks([rank + 1, 10], world, cpu)}
    try:
        result["steps"] = steps_on_every_rank(steps[rank], world, cpu)
    except RuntimeError as exc:
        result["error"] = str(exc)
    _leave(rank, out, result)


def _run(tmp_path, steps: list[int]) -> list[dict]:
    return _spawn(tmp_path, "-".join(map(str, steps)), _steps_worker, len(steps), steps)


def test_ranks_that_disagree_on_the_step_count_fail_loudly_on_every_rank(tmp_path):
    """RELIABILITY: every rank takes the same steps (DDP's and the loss's collectives pair up only then); the phase
    end's check raises on every rank when their counts differ, instead of the run going on with ranks out of step."""
    agree = _run(tmp_path, [12, 12])
    assert [r["steps"] for r in agree] == [[12, 12], [12, 12]] and not any("error" in r for r in agree)
    assert [r["gather"] for r in agree] == [[{"rank": 0}, {"rank": 1}]] * 2
    assert [r["sum"] for r in agree] == [[3, 20]] * 2
    disagree = _run(tmp_path, [12, 13])
    assert [r.get("error") for r in disagree] == ["ranks disagree on the step count at a phase end: [12, 13]"] * 2


def _clock_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """``Worker.log_window`` on each rank, its clock due or not per case; records what each rank decided."""
    import time

    import reclip_ray.train.worker as worker_module
    from reclip_ray.train.checkpoint import CheckpointClock, TrainState
    from reclip_ray.train.worker import Worker

    join(rank, world, init_file)
    worker_module.console_line = lambda *args: "window"  # rank 0's line: not what this test is about
    w = Worker.__new__(Worker)  # only what log_window reads
    w.rank, w.world, w.device = rank, world, torch.device("cpu")
    w.cfg = SimpleNamespace(data=SimpleNamespace(max_bad_fraction=0.1))
    w.state, w.schedule = TrainState(step=3), None
    w.feed = SimpleNamespace(recorded=10, available=0, bad=0, example=None)
    w.decode_fallback, w.missing_actor, w.already_logged, w.board = 0, None, 10, None
    window = SimpleNamespace(metrics=lambda *args: {})
    decided = []
    for due_on in ([0], [1], [0, 1], []):  # the ranks whose own clock says a checkpoint is due
        w.checkpoint_clock = CheckpointClock(1.0)
        if rank in due_on:
            w.checkpoint_clock.t0 = time.monotonic() - 61.0
        decided.append(w.log_window(None, window, {}, 0.0, [32] * world))
    _leave(rank, out, decided)


def test_a_checkpoint_by_time_follows_rank_0s_clock_on_every_rank(tmp_path):
    """RELIABILITY: ``checkpoint.every_minutes`` is decided at a log window by rank 0's clock, and its answer rides on
    the window's all-reduce, so every rank checkpoints at the same step (a rank that checkpointed alone would wait
    in Ray Train's report for the others forever). Rank 1's clock, ahead or behind, decides nothing."""
    decided = _spawn(tmp_path, "clock", _clock_worker, 2)
    # cases: only rank 0 due, only rank 1 due, both, neither
    assert decided == [[True, False, True, False]] * 2, decided


def _init_from_worker(rank: int, world: int, init_file: str, out: str, cfg_yaml: str, tokenizer: str, weights: str,
                      init_sync: bool) -> None:
    """As ``Worker`` starts: the same seed on every rank, ``init_from_rank0`` (``Worker._restore``'s call), then the
    DDP wrap; records how often this rank read the weights, and checksums of its parameters and buffers and of the
    weights file's."""
    from reclip_ray import init_weights
    from reclip_ray.config import from_dict
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.model import build_model

    import yaml

    join(rank, world, init_file)
    cfg = from_dict(yaml.safe_load(cfg_yaml))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tokenizer=load_tokenizer(tokenizer))
    reads, read_state = [], init_weights.read_state
    init_weights.read_state = lambda *a, **k: reads.append(1) or read_state(*a, **k)
    init_weights.init_from_rank0(model, weights, rank)
    ddp = torch.nn.parallel.DistributedDataParallel(model, init_sync=init_sync)
    source, _ = read_state(weights, pool=cfg.model.vision.pool)
    state = ddp.module.state_dict()
    _leave(rank, out, {"reads": len(reads), "model": {k: float(v.double().sum()) for k, v in state.items()},
                       "weights": {k: float(v.double().sum()) for k, v in source.items()}})


def test_a_workers_fresh_start_reads_init_from_on_rank_0_alone(tmp_path, tokenizer_path, monkeypatch):
    """README: "rank 0 alone reads it". The test below runs ``init_from_rank0`` itself; this one ``Worker._restore``
    (no checkpoint from Ray Train: a fresh start), so a worker that read the weights on every rank fails here."""
    import ray.train

    from reclip_ray import init_weights
    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.export import export_model
    from reclip_ray.model import build_model
    from reclip_ray.train import worker

    cfg = load_config("tiny", [f"data.tokenizer={tokenizer_path}"])
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(123)
    export_model(build_model(cfg.model, tokenizer=tok), tok, cfg, tmp_path / "weights")
    cfg.model.init_from = str(tmp_path / "weights")
    reads, read_state = [], init_weights.read_state
    monkeypatch.setattr(init_weights, "read_state", lambda *a, **k: reads.append(1) or read_state(*a, **k))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    logged = []
    monkeypatch.setattr(worker.tracking, "log_metrics", lambda *a, **k: logged.append(a[2]))
    monkeypatch.setattr(worker.tracking, "set_tags", lambda *a, **k: None)
    said = {}
    for rank in (1, 0):
        w = object.__new__(worker.Worker)  # the fields _restore reads, as Worker.__init__ sets them
        w.cfg, w.rank, w.run_dir, w.tracking_uri = cfg, rank, str(tmp_path / "run"), "unused"
        w.model = build_model(cfg.model, tokenizer=tok)
        w.optimizer = torch.optim.SGD(w.model.parameters(), lr=0.1)
        w.say = lambda text, rank=rank: said.setdefault(rank, []).append(text)
        w._restore("run-id")
        assert len(reads) == (0 if rank else 1), f"rank {rank}: {len(reads)} reads of model.init_from"
    assert list(said) == [0] and logged == [{"init_from_applied": 1}]


def test_init_from_read_by_rank_0_alone_reaches_every_rank_through_the_ddp_wrap(tmp_path, tokenizer_path):
    """``Worker._restore`` reads ``model.init_from`` on rank 0 only (``init_from_rank0``: a vit-l-16 file is 1.7 GB,
    read once, not once per GPU) and leaves the other ranks to DDP's wrap, which broadcasts rank 0's parameters and
    buffers. Here every rank ends with the file's weights, read once; without the broadcast (``init_sync=False``)
    rank 1 keeps its own."""
    from reclip_ray.config import load_config
    from reclip_ray.data.tokenizer import load_tokenizer
    from reclip_ray.export import export_model
    from reclip_ray.model import build_model

    cfg = load_config("tiny", [f"data.tokenizer={tokenizer_path}"])
    tok = load_tokenizer(tokenizer_path)
    torch.manual_seed(123)  # not the run's seed: weights no rank would make itself
    export_model(build_model(cfg.model, tokenizer=tok), tok, cfg, tmp_path / "weights")
    args = (cfg.to_yaml(), str(tokenizer_path), str(tmp_path / "weights"))
    synced = _spawn(tmp_path, "init-from", _init_from_worker, 2, *args, True)
    assert [rank["reads"] for rank in synced] == [1, 0]
    for rank in synced:
        assert rank["model"] == synced[0]["model"]
        assert all(rank["model"][k] == v for k, v in rank["weights"].items()), "a rank trains without the weights"
    unsynced = _spawn(tmp_path, "init-from-unsynced", _init_from_worker, 2, *args, False)
    assert unsynced[1]["model"] != unsynced[0]["model"]  # what the test would see if the wrap broadcast nothing
