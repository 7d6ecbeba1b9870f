"""The worker loop's own collectives (``train/collectives.py``) on a real gloo group of 2 processes, without Ray."""

from __future__ import annotations

import datetime
import json

import torch
import torch.multiprocessing as mp


def _steps_worker(rank: int, world: int, steps: list[int], init_file: str, out: str) -> None:
    import torch.distributed as dist

    from reclip_ray.train.collectives import gather, steps_on_every_rank, sum_over_ranks

    torch.set_num_threads(1)
    # bounded: a rank left alone in a collective fails the test in a minute instead of gloo's 30
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    cpu = torch.device("cpu")
    result = {"gather": gather({"rank": rank}, world), "sum": sum_over_ranks([rank + 1, 10], world, cpu)}
    try:
        result["steps"] = steps_on_every_rank(steps[rank], world, cpu)
    except RuntimeError as exc:
        result["error"] = str(exc)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _run(tmp_path, steps: list[int]) -> list[dict]:
    name = "-".join(map(str, steps))
    out = str(tmp_path / f"out-{name}")
    mp.spawn(_steps_worker, args=(len(steps), steps, str(tmp_path / f"init-{name}"), out), nprocs=len(steps), join=True)
    return [json.loads(open(f"{out}.{r}").read()) for r in range(len(steps))]


def test_ranks_that_disagree_on_the_step_count_fail_loudly_on_every_rank(tmp_path):
    """RELIABILITY: every rank takes the same steps (DDP's and the loss's collectives pair up only then); the phase
    end's check raises on every rank when their counts differ, instead of the run going on with ranks out of step."""
    agree = _run(tmp_path, [12, 12])
    assert [r["steps"] for r in agree] == [[12, 12], [12, 12]] and not any("error" in r for r in agree)
    assert [r["gather"] for r in agree] == [[{"rank": 0}, {"rank": 1}]] * 2
    assert [r["sum"] for r in agree] == [[3, 20]] * 2
    disagree = _run(tmp_path, [12, 13])
    assert [r.get("error") for r in disagree] == ["ranks disagree on the step count at a phase end: [12, 13]"] * 2
