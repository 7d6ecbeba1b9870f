"""How rank 0's checkpoint gets from its local folder to a run folder on object storage: whole, or the report fails.

Ray Train 2.60 copies a reported checkpoint with ``pyarrow.fs.copy_files`` (``StorageContext.
persist_current_checkpoint``). On S3 that copy never closes its output streams, their destructors do: a refused part
was only "Error ignored when destroying file" on stderr, the copy returned, the object was not written and its
multipart upload stayed open (seen on the moto server, ``tests/test_persist.py``). Ray Train then registered a
checkpoint without ``state.pt``; the next start got it from ``ray.train.get_checkpoint()`` and failed to load it,
a ``CheckpointError``, which the run takes as deterministic: it could not resume until someone deleted that folder.
The copy also held a copy of each file in memory: a 300 MB ``state.pt`` added 385 MB to rank 0's peak, this
upload 89 MB (BENCHMARKS.md, "Memory of a large write to S3"); for vit-l-16 the copy is gigabytes.

So for a run folder on object storage the report passes ``checkpoint_upload_fn``: ``storage.upload_dir`` writes
each file whole or raises (a failed multipart upload is aborted) with ~80 MB per file in flight, and the function
returns the ``Checkpoint`` Ray Train's own copy returns (its filesystem, its path: Ray Train registers it, hands it
back at the next start and deletes it past ``num_to_keep`` through that filesystem). A failure raises out of the
report (``sync``) or, with ``checkpoint.upload: async``, out of Ray Train's copy thread, which puts it on the training
thread's error queue: either way the attempt fails before the checkpoint is registered, and Ray Train restarts it
from the checkpoint before (``run.max_failures``). A folder the failed upload began is removed (best effort); one
left anyway (the removal failed too) is never registered, and nothing of ours lists checkpoint folders: every reader
goes through Ray Train's snapshot (``handover.latest_checkpoint_state``, ``ray.train.get_checkpoint``).

A local (or shared-filesystem) run folder keeps Ray Train's copy: there pyarrow writes straight to the file, and an
error (a full disk) raises from the write.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from reclip_ray import storage
from reclip_ray.errors import CheckpointError


def checkpoint_uploader(run_dir: str, ray_storage: Any) -> Callable[[Any, str], Any] | None:
    """The ``checkpoint_upload_fn`` for ``ray.train.report`` of a run in ``run_dir``; None for a local run folder
    (Ray Train's own copy). ``ray_storage`` is Ray Train's ``StorageContext``
    (``ray.train.get_context().get_storage()``): the returned checkpoint is on its filesystem at its path.

    Our run folder must be Ray Train's experiment folder (``launch.build_trainer`` gives Ray ``storage.pyarrow_uri``
    of the same storage path and the run's name): checked here, once, so that a storage path the two read otherwise
    is one line at the first start, not checkpoints written where ``latest_checkpoint_state`` never looks. (The one
    known, ``s3://b//runs``, whose empty segment pyarrow's path drops, the launch spells as pyarrow reads it:
    ``storage.normalize``.)"""
    if storage.local_path(run_dir) is not None:
        return None
    ours, theirs = storage.filesystem(run_dir)[1], ray_storage.experiment_fs_path
    if ours != theirs:
        raise CheckpointError(f"run folder {run_dir} is {ours!r} on its filesystem, Ray Train's experiment folder "
                              f"is {theirs!r}: checkpoints would not be where the run looks for them; spell "
                              "run.storage_path so that both read it alike (no '//' in it)")

    def upload(checkpoint: Any, name: str) -> Any:
        """``checkpoint`` (a local folder, ``Checkpoint.from_directory``) to ``run_dir/name``, each file whole;
        raises if a file could not be written, after removing the folder it began."""
        import ray.train

        target = storage.join(run_dir, name)
        began = not storage.exists(target)  # a folder already there (a retry's, a crashed run's) is replaced
        try:
            storage.upload_dir(checkpoint.path, target)
        except Exception:
            if began:
                with contextlib.suppress(Exception):  # the upload's own error is the one raised
                    storage.delete_dir(target)
            raise
        return ray.train.Checkpoint(path=ray_storage.build_checkpoint_path_from_name(name),
                                    filesystem=ray_storage.storage_filesystem)

    return upload
