"""benchmarks/gpu_wheels.lock.json: the wheel set that carries Ray and MLflow to the lent GPU machine is complete,
slimmed and inside the 64 MiB a device call carries. Offline: the lock records each wheel's Requires-Dist (read
from the wheel when the lock was written; ``gpu_wheels.py --verify`` re-checks the files against it)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_wheels.py"


@pytest.fixture(scope="module")
def gw():
    spec = importlib.util.spec_from_file_location("gpu_wheels_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lock(gw):
    return json.loads(gw.LOCK.read_text())


def test_every_requirement_of_the_pinned_ray_and_mlflow_is_carried_or_on_the_device(gw, lock):
    # Pinned to what is installed here, where the suite passes.
    assert f"ray[default,train,data,tune]=={metadata.version('ray')}" in lock["roots"]
    assert f"mlflow-skinny=={metadata.version('mlflow')}" in lock["roots"]
    assert gw.problems(lock) == []
    names = {w["name"] for w in lock["wheels"]}
    assert {"ray", "mlflow-skinny", "sqlalchemy", "alembic", "pydantic", "jsonschema", "protobuf"} <= names
    assert not names & set(lock["device"]), "a package is both carried and left to the device"
    assert set(lock["device"]) == set(gw.DEVICE), "the lock is stale: rerun python benchmarks/gpu_wheels.py"
    assert set(lock["device"]) <= gw.DEVICE_LIST  # only what the device's package list has
    assert len({w["name"] for w in lock["wheels"]}) == len(lock["wheels"])  # one version of each: two stop pip
    # Left out on purpose, each with its reason (the CPU dry run runs the job without them).
    assert lock["excluded"] == gw.EXCLUDE and not names & set(lock["excluded"])
    assert next(w for w in lock["wheels"] if w["name"] == "sqlalchemy")["file"].endswith("-py3-none-any.whl")


@pytest.mark.parametrize("plant", ["drop_pydantic", "drop_requests", "old_device_numpy", "old_carried_protobuf"])
def test_the_completeness_check_catches_a_missing_or_too_old_package(gw, lock, plant):
    broken = copy.deepcopy(lock)
    if plant.startswith("drop_"):
        name = plant[len("drop_"):]
        broken["wheels"] = [w for w in broken["wheels"] if w["name"] != name]
        assert any(p.startswith(f"{name} ") and "neither carried nor provided" in p for p in gw.problems(broken))
    elif plant == "old_device_numpy":
        broken["device"]["numpy"]["version"] = "1.19.0"  # Ray Data asks numpy>=1.20
        assert any(p.startswith("numpy 1.19.0 does not meet") for p in gw.problems(broken))
    else:
        next(w for w in broken["wheels"] if w["name"] == "protobuf")["version"] = "3.19.0"
        assert any(p.startswith("protobuf 3.19.0 does not meet ray's") for p in gw.problems(broken))


def test_on_the_device_the_actual_versions_are_checked(gw, lock):
    """--check-env's check: a provided package missing or too old on the machine is named."""
    installed = {n: metadata.version(n) for n in lock["device"]}  # this machine's, where the suite passes
    assert gw.problems(lock, installed) == []
    del installed["pyarrow"]
    assert any(p.startswith("pyarrow ") and "not installed" in p for p in gw.problems(lock, installed))
    installed["pyarrow"] = "16.0.0"  # Ray Data asks pyarrow>=17.0.0
    assert any(p.startswith("pyarrow 16.0.0 does not meet") for p in gw.problems(lock, installed))


def test_ray_is_slimmed_and_the_set_fits_the_travel_budget(gw, lock):
    ray = next(w for w in lock["wheels"] if w["name"] == "ray")
    slim = lock["ray_slimmed"]
    assert "ray/jars/" in slim["dropped_prefixes"] and slim["members_removed"] > 0
    # The lock's Ray was slimmed as the script slims now; Serve and LLM (0.9 MB) are what keeps ~1 MB of slack.
    assert slim["dropped_prefixes"] == list(gw.RAY_DROP), "the lock is stale: rerun python benchmarks/gpu_wheels.py"
    assert {"ray/serve/", "ray/llm/"} <= set(slim["dropped_prefixes"])
    assert slim["size_before"] - ray["size"] > 30e6  # the jar alone is 34.5 MB
    assert ray["size"] < 50e6
    assert sum(w["size"] for w in lock["wheels"]) == lock["wheels_bytes"]
    total = gw.tree_size() + lock["wheels_bytes"]
    assert total + gw.MARGIN <= gw.BUDGET, f"{total / 2**20:.1f} MiB travel (+ margin) > {gw.BUDGET / 2**20:.0f} MiB"


def test_slimming_drops_every_ray_drop_prefix_and_its_record_lines_and_keeps_the_rest(gw, tmp_path):
    wheel = tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"
    ui = "ray/dashboard/client/build/"
    # Kept: what the dashboard imports at start (every module under ray/dashboard/modules/, ServeHead included),
    # ray.data.llm (imports ray.llm only when used), Tune and Train themselves.
    keep = ["ray/__init__.py", ui + "index.html", ui + "static/css/main.css", "ray/data/__init__.py",
            "ray/dashboard/modules/serve/serve_head.py", "ray/data/llm.py", "ray/tune/__init__.py",
            "ray/train/torch/__init__.py"]
    drop = ["ray/jars/ray_dist.jar", ui + "static/js/main.js", ui + "static/js/main.js.map", ui + "static/media/a.png",
            ui + "speedscope-1.5.3/speedscope.js", "ray/rllib/__init__.py", "ray/serve/__init__.py",
            "ray/serve/_private/api.py", "ray/llm/__init__.py", "ray/tune/examples/pbt_function.py",
            "ray/train/examples/pytorch/__init__.py"]
    assert all(any(n.startswith(p) for n in drop) for p in gw.RAY_DROP), "a dropped prefix has no member here"
    record = "".join(f"{n},sha256=x,1\n" for n in keep + drop) + "ray-2.60.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for n in keep + drop:
            z.writestr(n, "x" * 100)
        z.writestr("ray-2.60.0.dist-info/RECORD", record)
    assert set(gw.undropped(wheel)) == set(gw.RAY_DROP)  # --verify's check finds each prefix before slimming
    out = gw.slim_ray(wheel)
    assert gw.undropped(wheel) == {}
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        lines = z.read("ray-2.60.0.dist-info/RECORD").decode().splitlines()
    assert out["members_removed"] == len(drop)
    assert names == keep + ["ray-2.60.0.dist-info/RECORD"]
    assert [line.split(",")[0] for line in lines] == keep + ["ray-2.60.0.dist-info/RECORD"]
    first = wheel.read_bytes()
    gw.slim_ray(wheel)  # idempotent and byte-for-byte reproducible (the lock's sha256 can be re-made)
    assert wheel.read_bytes() == first


def test_the_device_venv_pins_the_devices_versions_and_refuses_another_python(gw, tmp_path, monkeypatch):
    """``--device-venv`` builds the interpreter of the truest CPU dry run: Python 3.12 with the device's torch 2.11
    etc. Another Python is refused before anything is made; on 3.12 every version read on the device is pinned."""
    if f"{sys.version_info.major}.{sys.version_info.minor}" != gw.PYTHON:
        with pytest.raises(SystemExit, match=f"the device runs {gw.PYTHON}"):
            gw.device_venv(tmp_path / "venv", sys.executable)
        assert not (tmp_path / "venv").exists()
    calls = []
    monkeypatch.setattr(gw.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        type("Done", (), {"stdout": f"{gw.PYTHON}\n"})())
    assert gw.device_venv(tmp_path / "venv", "python3.12") == 0
    install = calls[-1]
    assert install[:4] == [str(tmp_path / "venv" / "bin" / "python"), "-m", "pip", "install"]
    assert {"torch==2.11.0", "torchvision==0.26.0", "numpy==2.5.2", "timm==1.0.29"} <= set(install)
    assert {r.split("==")[0] for r in install[5:]} >= set(gw.DEVICE)  # every provided package, pinned or not
