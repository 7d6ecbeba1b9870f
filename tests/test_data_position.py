"""A restart continues the data where it stopped (Ray integration, the shared test cluster).

Every rank writes the keys it trains at each step (``fault.record_rows``). An uninterrupted run (the session's
2-worker ``in_order_run``, conftest.py) is compared with a run of the same config that fails (2 workers, no
retries), is rerun on 1 worker (a resize), and fails once more inside ``fit()`` (an in-run restart from the last
checkpoint). Steps re-run after a restart replace the lost attempt's records, so the
rows counted are the rows that made it into the final weights.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import IN_ORDER, mlflow_run

pytestmark = pytest.mark.slow

BATCH = 64


def trained_rows(run_dir: Path) -> dict[int, list[tuple[int, int, str]]]:
    """{step: [(phase, pass, key), ...]} from the rows the last attempt of each step trained."""
    by_step: dict[int, list[dict]] = {}
    for path in sorted((run_dir / "rows").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_step.setdefault(rec["step"], []).append(rec)
    out = {}
    for step, recs in by_step.items():
        recs.sort(key=lambda r: r["t"])
        last = recs[-recs[-1]["world"]:]  # a later attempt's records of a step all come after an earlier one's
        out[step] = [(r["phase"], p, k) for r in last for p, k in zip(r["passes"], r["keys"])]
    return out


def _run(make_cfg, name, workers, extra):
    """The config of ``in_order_run`` (its stream in the order of the shards, so that runs compare row for row), with
    checkpoints every 2 steps and no evaluation, plus ``extra``."""
    from reclip_ray.train.launch import run_training

    cfg = make_cfg(name, workers=workers, extra=[*IN_ORDER, "checkpoint.every_samples=128", "eval.at_phase_end=false",
                                                 *extra])
    return cfg, run_training(cfg)


def test_a_restarted_or_resized_run_trains_the_rows_an_uninterrupted_run_trains(in_order_run, make_cfg, tmp_path):
    from reclip_ray.train.ray_errors import root_message

    _, ref_cfg, ref = in_order_run(2)
    ref_rows = trained_rows(Path(ref["run_dir"]))

    # 2 workers fail at 192 samples (checkpoint at 128) with no retry; the same command on 1 worker resumes and
    # fails once more at 320 (checkpoint at 256), which Ray Train restarts inside fit().
    with pytest.raises(Exception) as info:
        _run(make_cfg, "broken", 2, ["fault.fail_at_samples=192", "fault.fail_rank=1", "run.max_failures=0"])
    assert "fault injected at 192" in root_message(info.value)
    cfg, broken = _run(make_cfg, "broken", 1, ["fault.fail_at_samples=320", "run.max_failures=1"])
    assert (cfg.data, cfg.phases, cfg.train, cfg.model) == (ref_cfg.data, ref_cfg.phases, ref_cfg.train, ref_cfg.model)
    rows = trained_rows(Path(broken["run_dir"]))

    assert sorted(rows) == sorted(ref_rows) == list(range(1, 17))
    for step, got in rows.items():  # every step trained exactly the rows it counts
        assert len(got) == BATCH, (step, len(got))
    for phase in (0, 1):
        mine = Counter(r for s in rows.values() for r in s if r[0] == phase)
        theirs = Counter(r for s in ref_rows.values() for r in s if r[0] == phase)
        assert max(mine.values()) == 1, f"phase {phase}: a row was trained twice after the restarts"
        # The same seeded stream: rows the uninterrupted run trained and this one skipped are at most one global
        # batch (blocks in flight when a worker stopped are read again later, in another worker's share); a replayed
        # phase start would skip hundreds.
        skipped = sum((theirs - mine).values())
        print(f"\n[data-position] phase {phase}: {sum(mine.values())} rows, {skipped} of the uninterrupted run's "
              "rows not trained")
        assert skipped <= BATCH, skipped

    client, run = mlflow_run(tmp_path / "mlflow.db", broken["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    restarts = [m.value for m in client.get_metric_history(run.info.run_id, "restarts")]
    assert max(restarts) == 2  # the rerun and the in-fit restart


def test_a_relaunch_that_changed_how_the_stream_is_numbered_refuses_before_mlflow_or_ray(make_cfg, tmp_path,
                                                                                        monkeypatch):
    """A checkpoint's data position counts units and rows of a stream laid out by ``train.seed``,
    ``data.group_shards``, ``data.chunk_rows`` and ``data.shuffle``, stored beside it (``run_names.stream_layout``;
    the S3 reliability test reads it from a real checkpoint). A relaunch with another value refuses in one line that
    names it, before MLflow or Ray; the same values, a checkpoint at a phase end (the next phase starts afresh) and
    one from before the layout was stored go on."""
    from reclip_ray.errors import DataError
    from reclip_ray.run_names import CHECKPOINT_SNAPSHOT, stream_layout
    from reclip_ray.train import launch
    from reclip_ray.train.run_state import read_run_state

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(launch, "open_mlflow_run", reached)
    monkeypatch.setattr(launch, "init_ray", reached)
    run_dir = tmp_path / "runs" / "layout"
    (run_dir / "checkpoint_1").mkdir(parents=True)
    (run_dir / CHECKPOINT_SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}))
    position = {"phase": 0, "frontier": 2, "units": "4-5", "partial": [], "layout": stream_layout(make_cfg("layout"))}

    def relaunch(meta: dict, *changes: str) -> None:
        (run_dir / "checkpoint_1" / "meta.json").write_text(json.dumps(meta))
        launch.run_training(make_cfg("layout", extra=changes))

    with pytest.raises(Reached):
        relaunch({"phase": 0, "data": position})
    with pytest.raises(DataError) as refused:
        relaunch({"phase": 0, "data": position}, "data.chunk_rows=32", "train.seed=7", "data.group_shards=16")
    assert str(refused.value) == (
        "checkpoint checkpoint_1's data position was made with train.seed=0 data.chunk_rows=64, this launch has "
        "train.seed=7 data.chunk_rows=32: resuming would skip or repeat rows; rerun with --set train.seed=0 "
        "--set data.chunk_rows=64 (or a new run.name)")
    assert read_run_state(str(run_dir)) == {}  # no attempt counted
    with pytest.raises(Reached):
        relaunch({"phase": 0, "phase_done": True, "data": position}, "data.chunk_rows=32")
    with pytest.raises(Reached):
        relaunch({"phase": 0, "data": {k: v for k, v in position.items() if k != "layout"}}, "data.chunk_rows=32")
