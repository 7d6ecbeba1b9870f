"""The phases' datasets for ``TorchTrainer(datasets=...)``: one factory per phase, which Ray Train calls at every
start of the worker group to rebuild the phase's stream from where the checkpoint it restores left it.
"""

from __future__ import annotations

import math
from typing import Any

from reclip_ray.config import Config
from reclip_ray.errors import DataError
from reclip_ray.run_names import block_rows, phase_dataset_name, phase_seed, shuffle_buffer_rows
from reclip_ray.train.checkpoint import phase_finished
from reclip_ray.train.handover import latest_checkpoint_state, raise_if_fatal, record_data_start


def build_datasets(cfg: Config, tokenizer_json: str, run_dir: str, missing_actor: Any = None) -> dict[str, Any]:
    """One dataset factory per phase, for ``TorchTrainer(datasets=...)``.

    Ray Train calls a callable dataset again at every start of the worker group (a restart, an elastic resize, a
    rerun of the same command), so each factory rebuilds its phase's stream from the data position stored in the
    checkpoint that Ray Train is about to restore: a restart continues with the rows that follow, none trained
    twice. The footers are read once here (in parallel) and travel with the factories.
    """
    from reclip_ray.data.shards import list_parquet_files, read_footers
    from reclip_ray.schedule import Schedule

    shards = read_footers(list_parquet_files(cfg.data.train), cfg.data.image_column)
    rows = sum(s.rows for s in shards)
    present = rows - sum(s.absent for s in shards)
    if present <= 0:
        raise DataError(f"{cfg.data.train}: the shards hold no rows" if rows == 0 else
                        f"{cfg.data.train}: all {rows} rows are absent (no image bytes: failed downloads?)")
    usable = max(1.0, present * (1.0 - cfg.data.max_bad_fraction))
    concurrency = decode_concurrency(cfg)
    datasets = {}
    for plan in Schedule.from_config(cfg).phases:
        datasets[phase_dataset_name(plan.index)] = PhaseDatasetFactory(
            cfg, plan.index, shards, passes=max(1, math.ceil(phase_rows_needed(cfg, plan) / usable)),
            tokenizer_json=tokenizer_json, run_dir=run_dir, concurrency=concurrency, missing_actor=missing_actor)
    return datasets


def phase_rows_needed(cfg: Config, plan: Any) -> int:
    """Good rows a phase's stream must hold so that no rank runs out: ``samples + 2 (N - 1) + slack``, N =
    ``scaling.max_workers`` (the worst case of any worker count up to it).

    ``streaming_split(equal=True)`` gives each of N ranks ``floor(rows / N)`` rows (it drops fewer than N), and
    ``batch_split.step_split`` rotates the rows that do not divide, so from any step on a rank trains at most
    ``ceil(samples / N)`` of the phase's remaining rows: ``N ceil(samples / N) + N - 1 <= samples + 2 (N - 1)`` rows
    are enough. A restart rebuilds the stream without the rows already trained (``feed.DataPosition``), so the
    bound holds from every checkpoint on. The slack, one shuffle buffer and four blocks per worker, absorbs bad
    rows and unit markers falling unevenly on the ranks' shares (the bad-row budget, ``max_bad_fraction``, is
    taken out of every pass by the caller).
    """

    workers = cfg.scaling.max_workers
    local = -(-plan.batch_size // cfg.scaling.min_workers)  # the largest share, which sizes the largest buffer
    slack = workers * (shuffle_buffer_rows(cfg, local) + 4 * block_rows(cfg, plan.image_size))
    return plan.samples + 2 * (workers - 1) + slack


class PhaseDatasetFactory:
    """Called by Ray Train (in its controller) at every worker-group start: the phase's dataset from where the
    checkpoint about to be restored left it."""

    def __init__(self, cfg: Config, phase: int, shards: list, *, passes: int, tokenizer_json: str, run_dir: str,
                 concurrency: int, missing_actor: Any = None) -> None:
        from reclip_ray.data.copies import choose_sources
        from reclip_ray.data.stream import PhaseStream

        self.cfg, self.phase, self.run_dir = cfg, phase, run_dir
        self.plan = cfg.phases[phase]
        # The cheapest source per shard: a shrunk copy that covers the phase's image size, else the full image.
        self.sources = choose_sources(shards, self.plan.image_size, train=True, image_column=cfg.data.image_column,
                                      use_copies=cfg.data.use_copies)
        self.stream = PhaseStream(shards, seed=phase_seed(cfg, phase), passes=passes,
                                  group_shards=cfg.data.group_shards, chunk_rows=cfg.data.chunk_rows,
                                  shuffle=cfg.data.shuffle == "files", sources=self.sources.columns)
        self.tokenizer_json = tokenizer_json
        self.concurrency = concurrency
        self.missing_actor = missing_actor

    def __call__(self) -> Any:
        from reclip_ray.data.feed import DataPosition
        from reclip_ray.data.pipeline import phase_dataset
        from reclip_ray.data.schema import ColumnMap

        raise_if_fatal(self.run_dir)
        checkpoint, state = latest_checkpoint_state(self.run_dir)
        if phase_finished(self.phase, state.get("phase", 0), state.get("phase_done", False)):
            # The workers resume after this phase and never read it (Worker.finished): its stream is not rebuilt,
            # which costs this controller its read items and their dataset, 0.8 s for one pass over 140k shards
            # (BENCHMARKS.md, "A phase's dataset at each restart"), and ships them to Ray Train's dataset manager.
            import ray

            return ray.data.from_items([{"finished_phase": self.phase}])
        position = DataPosition.from_dict(state.get("data"))
        if position.phase != self.phase or state.get("phase_done"):
            position = DataPosition(phase=self.phase)
        record_data_start(self.run_dir, self.phase, checkpoint, position, sources=self.sources.as_dict())
        return phase_dataset(
            self.stream, ColumnMap.from_config(self.cfg.data), image_size=self.plan.image_size,
            text_length=self.plan.text_length, tokenizer_json=self.tokenizer_json, train=True,
            frontier=position.frontier, units=position.units, done=position.done,
            decode_batch_size=block_rows(self.cfg, self.plan.image_size),
            missing=self.cfg.data.missing_shards, missing_actor=self.missing_actor, concurrency=self.concurrency,
            on_device=self.cfg.data.decode_device == "cuda",
            keep_keys=self.cfg.fault.record_rows)


def decode_concurrency(cfg: Config) -> int:
    """Read+decode tasks in flight per phase: ``data.read_parallelism``, or by default one per CPU in the cluster
    (at least 4). Decoding is single-threaded PIL work; a fixed small cap starves the GPUs of a big node."""
    import ray

    from reclip_ray.data.pipeline import MAX_TASKS

    if cfg.data.read_parallelism > 0:
        return cfg.data.read_parallelism
    return max(MAX_TASKS, int(ray.cluster_resources().get("CPU", 0)))
