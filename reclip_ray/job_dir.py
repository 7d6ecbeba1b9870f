"""Where a run's outputs go when they are given as relative paths (or not at all): the working directory, except
when that is Ray's temporary copy of a ``ray job submit --working-dir``.

A job's entrypoint runs in the working directory Ray unpacked for it
(``<ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_<hash of the files>/``). The default
MLflow store (``mlflow.db``) and the default ``run.storage_path`` (``reclip_runs``) made there are lost to the user:
the folder is named by a hash of the submitted files, so the same command resubmitted after an edit finds a new,
empty MLflow store (the resumed run's history starts again in another run), and Ray deletes such folders when its
cache of them fills or its session ends. There, outputs go to ``$RECLIP_RAY_HOME``, by default ``~/reclip-ray``
on the node the job's driver runs on (the head node, unless the job was given other resources). Inputs (``data.*``
given relative) still resolve against the working directory: the files were submitted with it. A sweep resumed by
another submit resolves them in that submit's copy (``sweep.trial_config.keep_relative_inputs``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HOME_ENV = "RECLIP_RAY_HOME"
DEFAULT_HOME = "~/reclip-ray"


def ray_job_config() -> dict:
    """What Ray's job supervisor hands a ``ray job submit`` entrypoint (its driver) in ``RAY_JOB_CONFIG_JSON_ENV_VAR``:
    the job's ``runtime_env`` and ``metadata``; {} outside a job."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except ValueError:
        return {}
    return job if isinstance(job, dict) else {}


def temporary_working_dir() -> str | None:
    """The working directory when it is the copy Ray made of a job's ``--working-dir`` (``ray_job_config``'s
    runtime environment names one), else None."""
    runtime_env = ray_job_config().get("runtime_env")
    if not isinstance(runtime_env, dict) or not runtime_env.get("working_dir"):
        return None
    return os.getcwd()


def output_base() -> Path:
    """The folder relative output paths (``run.storage_path``, an SQLite MLflow store) are taken from; made if it is
    not there (SQLite makes no folder for its file)."""
    if temporary_working_dir() is None:
        return Path.cwd()
    home = Path(os.path.expanduser(os.environ.get(HOME_ENV) or DEFAULT_HOME)).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def output_note() -> str | None:
    """One line for the launch's log where outputs do not go to the working directory (None where they do)."""
    cwd = temporary_working_dir()
    if cwd is None:
        return None
    return (f"this job's working directory {cwd} is Ray's temporary copy of --working-dir: relative outputs (run "
            f"folder, MLflow store) go to {output_base()} (${HOME_ENV}, default {DEFAULT_HOME})")
