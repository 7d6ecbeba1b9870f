"""The pinned wheel set that carries Ray and MLflow to the lent GPU machine (``benchmarks/gpu_check.sh --e2e``).

The H200 machine (Python 3.12, manylinux x86_64, no network) has torch, timm, tokenizers, pyarrow, pandas, numpy,
pillow, grpcio and msgpack but neither Ray nor MLflow, and what travels with a call (the tracked tree + carried
paths) is capped at 64 MiB. This script resolves the project's Ray and MLflow requirements for that interpreter,
drops what the machine provides (``DEVICE``), downloads the rest into ``.whl/`` (ignored by git), slims the Ray
wheel (Java workers, a dashboard source map, RLlib, Serve, LLM, examples: nothing a Ray Train + Data + Tune job
imports, ``RAY_DROP``) and writes the tracked lock ``benchmarks/gpu_wheels.lock.json``: every wheel's file name,
version, size, sha256 and Requires-Dist, and what the job needs of each package the device provides.
tests/test_gpu_wheels.py checks the lock offline (every requirement is met by a carried wheel or a provided package;
the size budget holds).

  python benchmarks/gpu_wheels.py            resolve (pip --dry-run --report), download, slim, write .whl/ + lock
  python benchmarks/gpu_wheels.py --fetch    .whl/ from the lock's URLs (no resolution), Ray slimmed, then --verify
  python benchmarks/gpu_wheels.py --verify   check .whl/ against the lock (files, sizes, sha256, nothing of
        RAY_DROP left in Ray, budget)
  python benchmarks/gpu_wheels.py --check-env SITE    on the device, after the install: every requirement of the
        set is met by the interpreter's packages (the provided ones at the device's versions) and ray/mlflow are
        imported from SITE, not from anywhere else
  python benchmarks/gpu_wheels.py --cpu-set DIR   the CPU dry run: the same pinned versions for THIS interpreter
        (platform wheels re-downloaded, pure-Python ones copied from .whl/) in DIR
  python benchmarks/gpu_wheels.py --device-sim DIR   the CPU dry run: links to this interpreter's copies of the
        provided packages (and what they need), so that a run with ``python -S`` + PYTHONPATH sees only those and
        the target folder, as the device would
  python benchmarks/gpu_wheels.py --device-venv DIR [--python python3.12]   a Python 3.12 environment with the
        device's packages at its versions (torch 2.11, ...): PYTHON=DIR/bin/python makes the CPU dry run install and
        run the carried cp312 wheels themselves on the device's torch

Why MLflow needs more than ``mlflow-skinny``: the job's default store is SQLite (``tracking.resolve_tracking_uri``),
which MLflow opens through SQLAlchemy and migrates with Alembic. open_clip_torch is not carried (the 64 MiB): the
export check loads the weights against the run's model there instead (``gpu_e2e.py open-clip-check``), and
tests/test_openclip.py has open_clip load a vit-b-16 export. Ray gets its ``default`` extra, as pyproject.toml asks:
the dashboard runs Ray Train's placement-group cleaner and the state API (``train/cluster.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
LOCK = ROOT / "benchmarks" / "gpu_wheels.lock.json"
BUDGET = 64 * 2**20  # the device tool's cap on what travels (tracked tree + carried paths)
MARGIN = 2**20  # head-room for files added to the tree after the lock was written (the call is refused over 64 MiB)
PYTHON = "3.12"
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)]
# Python 3.12 on Linux x86_64, for evaluating the requirements' markers as the device would.
DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
              "os_name": "posix", "platform_machine": "x86_64"}
# Packages the job relies on the device for: big compiled wheels (carrying them would not fit) and the torch stack.
# Value: the device's version where a session has read it (device/KINDS.md, pip list of 2026-11), else None
# (checked there by --check-env against what the set requires). protobuf is on the device too but travels: Ray's
# generated code is protobuf 5.26.1 gencode, which refuses an older runtime, and the device's version is unknown;
# so does requests (google-api-core asks >= 2.33.0, a 2026 release).
DEVICE = {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "tokenizers": "0.23.2",
          "safetensors": "0.8.0", "huggingface-hub": "1.33.0", "timm": None, "pandas": None, "pyarrow": None,
          "pillow": None, "grpcio": None, "msgpack": None, "regex": None, "tqdm": None, "markupsafe": None,
          "matplotlib": None, "pyyaml": None, "urllib3": None, "idna": None, "certifi": None,
          "charset-normalizer": None,
          # Ray's dashboard server asks aiohttp>=3.14.4; the device has aiohttp and these (versions unknown: checked
          # there by --check-env, which reports a too old one but does not stop the job). 3.3 MB not carried.
          "aiohttp": None, "aiosignal": None, "aiohappyeyeballs": None, "frozenlist": None, "multidict": None,
          "propcache": None, "yarl": None, "attrs": None}
# The names on the device's package list (device/KINDS.md, as read on 2026-11-17): what --device-sim may expose.
DEVICE_LIST = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
# Required by the set but not carried (64 MiB): code paths this job never runs; the CPU dry run runs without them
# (E2E_CPU=1 bash benchmarks/gpu_check.sh --e2e) and its logs are searched for ModuleNotFoundError.
EXCLUDE = {
    "virtualenv": "ray[default]: runtime_env pip/uv/virtualenv only; this job's runtime_env sets env_vars (5.8 MB)",
    "py-spy": "ray[default]: the dashboard's stack-trace and CPU-profile buttons only (2.9 MB)",
    # databricks-sdk and cryptography cannot go (seen in the CPU dry run): mlflow.genai's import asks
    # importlib.util.find_spec("databricks.agents"), which imports the `databricks` namespace package, and MLflow's
    # SQL store imports cryptography.fernet (model registry webhooks).
}
# Carried as the pure-Python wheel: SQLAlchemy's C extensions only speed up result rows (2.1 MB instead of 4.7).
PURE = {"sqlalchemy"}
# Members dropped from the Ray wheel, each a prefix of member names: Java workers (34.5 MB), RLlib (reinforcement
# learning) and the dashboard web UI's scripts, source map (6.7 MB) and images; the dashboard server still starts
# (it needs client/build/ and client/build/static/, which keep index.html and the CSS), and serves its JSON API.
# Then Ray Serve (0.63 MB), Ray LLM (0.28 MB) and Tune's and Train's example scripts (0.08 MB): nothing in ray.init,
# Train, Data, Tune or the state API imports them. The dashboard imports every module under
# ray/dashboard/modules/ at start (a ModuleNotFoundError there stops it); its ServeHead imports ray.serve only inside
# its /api/serve/ handlers (which answer 501 without it), and `ray serve` / ray.data.llm are not used by the job.
RAY_DROP = ("ray/jars/", "ray/rllib/", "ray/dashboard/client/build/static/js/",
            "ray/dashboard/client/build/static/media/", "ray/dashboard/client/build/speedscope-",
            "ray/serve/", "ray/llm/", "ray/tune/examples/", "ray/train/examples/")
RAY_DROP_SUFFIX: dict[str, str] = {}


def roots() -> list[str]:
    """The pinned top-level requirements: the versions installed here, where the project's tests pass."""
    v = metadata.version
    return [f"ray[default,train,data,tune]=={v('ray')}", f"mlflow-skinny=={v('mlflow')}",
            f"sqlalchemy=={v('sqlalchemy')}", f"alembic=={v('alembic')}"]


def _pip_platform_args(python: str) -> list[str]:
    tag = python.replace(".", "")
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}",
            "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def resolve(python: str, reqs: list[str], pure: bool = False) -> list[dict]:
    """pip's resolution of ``reqs`` for ``python`` on manylinux x86_64 (``pure``: one pure-Python wheel, no deps).

    ``--dry-run --report`` needs only metadata, but an index that serves none makes pip download whole wheels:
    minutes here, so the answer is cached in the temp folder, keyed by the command.
    """
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation", "py", "--abi",
                 "none", "--platform", "any"] if pure else _pip_platform_args(python)
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed", "--report",
               str(Path(tmp, "report.json")), "--target", str(Path(tmp, "t")), *flags, *reqs]
        key = hashlib.sha256(" ".join([*flags, *reqs]).encode()).hexdigest()[:16]
        cache = Path(tempfile.gettempdir(), f"reclip_gpu_wheels_{key}.json")
        if cache.exists():
            return json.loads(cache.read_text())
        subprocess.run(cmd, check=True)
        install = json.loads(Path(tmp, "report.json").read_text())["install"]
        cache.write_text(json.dumps(install))
        return install


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode("utf-8")
    headers = text.split("\n\n", 1)[0].splitlines()
    field = {k: v for k, _, v in (h.partition(": ") for h in headers) if k in ("Name", "Version")}
    return field["Name"], field["Version"], [h.split(": ", 1)[1] for h in headers if h.startswith("Requires-Dist: ")]


def slim_ray(path: Path) -> dict:
    """Rewrite the Ray wheel without ``RAY_DROP`` (and their RECORD lines); same member order, dates and compression,
    so the result is byte-for-byte reproducible. Returns what was dropped."""
    def dropped(name: str) -> bool:
        return any(name.startswith(p) and name.endswith(RAY_DROP_SUFFIX.get(p, "")) for p in RAY_DROP)

    tmp = path.with_suffix(".slim")
    removed, removed_bytes = 0, 0
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            if dropped(info.filename):
                removed, removed_bytes = removed + 1, removed_bytes + info.compress_size
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
            dst.writestr(info, data, compress_type=info.compress_type)
    before = path.stat().st_size
    tmp.replace(path)
    return {"dropped_prefixes": list(RAY_DROP), "members_removed": removed, "compressed_bytes_removed": removed_bytes,
            "size_before": before}


def undropped(path: Path, prefixes: tuple[str, ...] = RAY_DROP) -> dict[str, int]:
    """How many members of the wheel at ``path`` are under each prefix that slimming drops (none once slimmed)."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    counts = {p: sum(n.startswith(p) for n in names) for p in prefixes}
    return {p: n for p, n in counts.items() if n}


def tree_size(root: Path = ROOT) -> int:
    """Bytes of the tracked files (what travels besides carried paths; untracked files travel too, see --verify)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def write_lock(out: Path = WHEELS) -> dict:
    reqs = roots()
    print(f"resolving {' '.join(reqs)} for Python {PYTHON} manylinux x86_64 (pip --dry-run)", flush=True)
    # No constraints from the device's versions: an index may not have them (numpy 2.5.2 made pip backtrack without
    # end); what the device provides is not carried, and problems() checks its known versions against the set.
    install = resolve(PYTHON, reqs)
    for i, item in enumerate(install):  # the pure-Python build where one exists and is smaller (PURE)
        if canonicalize_name(item["metadata"]["name"]) in PURE:
            install[i] = resolve(PYTHON, [f"{item['metadata']['name']}=={item['metadata']['version']}"], pure=True)[0]
    # Only what the roots reach without passing through a provided package: torch's own needs (nvidia-*, triton,
    # sympy, ...) are the device's business.
    resolved = [{"name": canonicalize_name(i["metadata"]["name"]), "version": i["metadata"]["version"],
                 "requires_dist": i["metadata"].get("requires_dist", [])} for i in install]
    kept = [w for w in resolved if w["name"] not in DEVICE and w["name"] not in EXCLUDE]
    reached = {canonicalize_name(r.name) for _, r, met in closure(reqs, kept, set(DEVICE), set(EXCLUDE))
               if met == "wheel"}
    carried = [i for i in install if canonicalize_name(i["metadata"]["name"]) in reached]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    urls = [i["download_info"]["url"] for i in carried]
    print(f"downloading {len(urls)} wheels into {out}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(out),
                    *_pip_platform_args(PYTHON), *urls], check=True)
    wheels, slimmed = [], {}
    for item in sorted(carried, key=lambda i: canonicalize_name(i["metadata"]["name"])):
        path = out / item["download_info"]["url"].rsplit("/", 1)[-1]
        expected = item["download_info"].get("archive_info", {}).get("hashes", {}).get("sha256")
        if expected and sha256(path) != expected:
            raise SystemExit(f"{path.name}: sha256 differs from the index's")
        name, version, requires = wheel_metadata(path)
        if canonicalize_name(name) == "ray":
            slimmed = slim_ray(path)
        wheels.append({"name": canonicalize_name(name), "version": version, "file": path.name,
                       "size": path.stat().st_size, "sha256": sha256(path), "requires_dist": requires,
                       "url": item["download_info"]["url"], "sha256_download": expected})
    lock = {
        "python": PYTHON, "platforms": "manylinux x86_64", "roots": reqs,
        "device": {n: {"version": v, "required": sorted(required_of(n, wheels, reqs))} for n, v in DEVICE.items()},
        "excluded": EXCLUDE, "pure": sorted(PURE), "ray_slimmed": slimmed, "wheels": wheels,
        "wheels_bytes": sum(w["size"] for w in wheels), "budget_bytes": BUDGET,
    }
    LOCK.write_text(json.dumps(lock, indent=1) + "\n")
    return lock


# ---------------------------------------------------------------------------------------------------- requirements


def _env(extra: str = "") -> dict[str, str]:
    return {**default_environment(), **DEVICE_ENV, "extra": extra}


def closure(roots_: list[str], wheels: list[dict], provided: set[str],
            excluded: set[str] = frozenset()) -> list[tuple[str, Requirement, str]]:
    """Every requirement reached from ``roots_`` through the carried wheels' Requires-Dist (markers evaluated for the
    device, extras followed): (who asks, requirement, what meets it: 'wheel', 'device', 'excluded' or 'MISSING')."""
    by_name = {w["name"]: w for w in wheels}
    out, todo, seen = [], [("roots", Requirement(r)) for r in roots_], set()
    while todo:
        who, req = todo.pop()
        name = canonicalize_name(req.name)
        wheel = by_name.get(name)
        met = "wheel" if wheel else "device" if name in provided else "excluded" if name in excluded else "MISSING"
        out.append((who, req, met))
        key = (name, tuple(sorted(req.extras)))
        if wheel is None or key in seen:
            continue
        seen.add(key)
        for line in wheel["requires_dist"]:
            sub = Requirement(line)
            extras = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate(_env(e)) for e in extras):
                todo.append((name, sub))
    return out


def required_of(name: str, wheels: list[dict], roots_: list[str]) -> set[str]:
    """The specifiers the set puts on a provided package (``>=17.0.0``; '' for any version)."""
    return {str(req.specifier) for _, req, _ in closure(roots_, wheels, set(DEVICE), set(EXCLUDE))
            if canonicalize_name(req.name) == name}


def project_requirements() -> list[Requirement]:
    """reclip-ray's own dependencies (pyproject.toml) but Ray and MLflow, which the roots stand for."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [r for r in map(Requirement, deps) if canonicalize_name(r.name) not in ("ray", "mlflow")]


def problems(lock: dict, installed: dict[str, str] | None = None) -> list[str]:
    """What the lock leaves unmet: a requirement no carried wheel or provided package meets, a carried wheel whose
    version is outside a specifier, a provided package whose known (or, with ``installed``, actual) version is."""
    provided = set(lock["device"])
    found = []
    carried = {w["name"] for w in lock["wheels"]}
    reached = closure(lock["roots"], lock["wheels"], provided, set(lock["excluded"]))
    reached += [("reclip-ray", r, "wheel" if canonicalize_name(r.name) in carried else "device"
                 if canonicalize_name(r.name) in provided else "MISSING") for r in project_requirements()]
    for who, req, met in reached:
        name = canonicalize_name(req.name)
        if met == "excluded":
            continue
        if met == "MISSING":
            found.append(f"{name} (needed by {who}: {req}) is neither carried nor provided by the device")
            continue
        if met == "wheel":
            version = next(w["version"] for w in lock["wheels"] if w["name"] == name)
        else:
            version = (installed or {}).get(name) or lock["device"][name]["version"]
            if installed is not None and name not in installed:
                found.append(f"{name} (needed by {who}: {req}) is not installed on this machine")
                continue
        if version and not SpecifierSet(str(req.specifier)).contains(Version(version), prereleases=True):
            found.append(f"{name} {version} does not meet {who}'s requirement {req}")
    return found


# ---------------------------------------------------------------------------------------------------- checks


def verify(out: Path = WHEELS) -> int:
    """.whl/ against the lock: the same files, sizes and sha256, nothing of ``RAY_DROP`` in Ray, the travel budget."""
    lock = json.loads(LOCK.read_text())
    errors = []
    files = {p.name for p in out.glob("*.whl")} if out.exists() else set()
    want = {w["file"]: w for w in lock["wheels"]}
    errors += [f"missing: {f}" for f in sorted(set(want) - files)]
    errors += [f"not in the lock: {f}" for f in sorted(files - set(want))]
    for f in sorted(set(want) & files):
        path = out / f
        if path.stat().st_size != want[f]["size"] or sha256(path) != want[f]["sha256"]:
            errors.append(f"{f}: size or sha256 differs from the lock")
        if want[f]["name"] == "ray":
            errors += [f"{f}: still has {n} member(s) under {p}" for p, n in undropped(path).items()]
    untracked = subprocess.run(["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True).stdout.split(b"\0")
    extra = sum((ROOT / n.decode()).stat().st_size for n in untracked if n and (ROOT / n.decode()).is_file())
    total = tree_size() + extra + sum((out / f).stat().st_size for f in files)
    errors += [f"travelling size {total:,} B is over {BUDGET:,} B"] if total > BUDGET else []
    errors += problems(lock)
    print(json.dumps({"wheels": len(files), "wheels_bytes": sum((out / f).stat().st_size for f in files),
                      "tree_bytes": tree_size(), "untracked_bytes": extra, "total_bytes": total,
                      "total_mib": round(total / 2**20, 2), "budget_mib": BUDGET / 2**20, "errors": errors}))
    return 1 if errors else 0


def check_env(site: str) -> int:
    """On the machine that runs the job, after ``pip install --target SITE``: every requirement met by what this
    interpreter imports (the provided packages at their actual versions), and Ray/MLflow come from SITE."""
    lock = json.loads(LOCK.read_text())
    installed: dict[str, str] = {}
    for dist in metadata.distributions():  # in sys.path order: the first one found is the one imported
        installed.setdefault(canonicalize_name(dist.metadata["Name"]), dist.version)
    errors = problems(lock, installed)
    try:
        import mlflow
        import ray
    except Exception as exc:  # noqa: BLE001 - a missing module of the set: say which, as one JSON line
        print(json.dumps({"check_env": "FAILED", "errors": errors + [f"import: {type(exc).__name__}: {exc}"]}))
        return 1

    site_path = os.path.realpath(site)
    for mod in (ray, mlflow):
        if not os.path.realpath(mod.__file__).startswith(site_path + os.sep):
            errors.append(f"{mod.__name__} imported from {mod.__file__}, not from {site_path}")
    provided = {n: installed.get(n) for n in lock["device"]}
    print(json.dumps({"check_env": "ok" if not errors else "FAILED", "ray": ray.__version__, "ray_file": ray.__file__,
                      "mlflow": mlflow.__version__, "provided": provided, "errors": errors}), flush=True)
    return 1 if errors else 0


# ---------------------------------------------------------------------------------------------------- CPU dry run


def _runs_here(file: str) -> bool:
    from packaging.tags import sys_tags

    here = set(sys_tags())
    return any(tag in here for tag in parse_wheel_filename(file)[3])


def cpu_set(dest: Path) -> int:
    """The lock's versions for this interpreter: wheels that run here copied from .whl/, the others downloaded."""
    lock = json.loads(LOCK.read_text())
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {(w["name"], Version(w["version"])) for w in lock["wheels"]}
    for stale in dest.glob("*.whl"):  # a wheel of an older lock would be installed too
        if parse_wheel_filename(stale.name)[:2] not in wanted:
            stale.unlink()
    have = {p.name for p in dest.glob("*.whl")}
    fetch = []
    for w in lock["wheels"]:
        if _runs_here(w["file"]):  # on Python 3.12 (--device-venv): every carried file itself, Ray slimmed as carried
            if w["file"] not in have:
                shutil.copy2(WHEELS / w["file"], dest / w["file"])
        elif not any(parse_wheel_filename(f)[:2] == (w["name"], Version(w["version"])) for f in have):
            fetch.append(f"{w['name']}=={w['version']}")
    if fetch:
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        print(f"downloading for Python {here}: {' '.join(fetch)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest),
                        *_pip_platform_args(here), *fetch], check=True)
    slim_ray(next(dest.glob("ray-*.whl")))  # as carried (idempotent): the dry run proves the slimmed Ray runs the job
    print(json.dumps({"cpu_set": str(dest), "wheels": len(list(dest.glob("*.whl")))}))
    return 0


def device_sim(dest: Path) -> int:
    """Links to this interpreter's copies of the provided packages and of what they need (as far as the device's list
    has it): with ``python -S`` and PYTHONPATH=TARGET:DEST, nothing else installed here (a newer Ray, MLflow, ...) is
    importable."""
    names, todo = set(), list(DEVICE) + ["packaging", "pyyaml", "pip"]  # the project, the check and pip need these
    while todo:
        name = canonicalize_name(todo.pop())
        if name in names or (name not in DEVICE and name not in DEVICE_LIST):
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        names.add(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**default_environment(), "extra": ""}):
                todo.append(req.name)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in sorted(names):
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists() and top != "__pycache__":
                (dest / top).symlink_to(src)
    print(json.dumps({"device_sim": str(dest), "packages": sorted(names)}))
    return 0


# What --device-venv pins beyond DEVICE: versions read on the H200 (BENCHMARKS.md, "GPU readiness").
DEVICE_SEEN = {"timm": "1.0.29"}


def device_venv(dest: Path, python: str) -> int:
    """A virtual environment of ``python`` (3.12, as on the device) with the packages the device provides, at the
    versions read there (torch 2.11, torchvision 0.26, timm 1.0.29, numpy 2.5.2, ...; the rest at their newest).
    With it as PYTHON, the dry run (``E2E_CPU=1``) installs and runs the carried cp312 wheels themselves, on the
    device's torch, where this machine's interpreter needs a set rebuilt for its own version. The torch wheel is
    the CUDA build (the index has no other for Linux): ~4 GB with its nvidia packages, which run on CPU."""
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if version != PYTHON:
        raise SystemExit(f"--python {python} is Python {version}; the device runs {PYTHON}")
    subprocess.run([python, "-m", "venv", str(dest)], check=True)
    pins = {**DEVICE, **DEVICE_SEEN}
    reqs = [f"{name}=={v}" if v else name for name, v in pins.items()] + ["packaging"]  # packaging: this script
    subprocess.run([str(dest / "bin" / "python"), "-m", "pip", "install", "--quiet", *reqs], check=True)
    print(json.dumps({"device_venv": str(dest), "python": version, "pinned": {n: v for n, v in pins.items() if v}}))
    return 0


def fetch(out: Path = WHEELS) -> int:
    """.whl/ from the lock's URLs (no resolution: seconds, not minutes), Ray slimmed again, then --verify."""
    lock = json.loads(LOCK.read_text())
    out.mkdir(exist_ok=True)
    for stale in set(p.name for p in out.glob("*.whl")) - {w["file"] for w in lock["wheels"]}:
        (out / stale).unlink()
    todo = [w for w in lock["wheels"] if not (out / w["file"]).exists() or sha256(out / w["file"]) != w["sha256"]]
    if todo:
        for w in todo:
            (out / w["file"]).unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(out),
                        *_pip_platform_args(PYTHON), *[w["url"] for w in todo]], check=True)
        for w in todo:
            if sha256(out / w["file"]) != w["sha256_download"]:
                raise SystemExit(f"{w['file']}: the download's sha256 differs from the lock's")
            if w["name"] == "ray":
                slim_ray(out / w["file"])
    return verify(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--verify", action="store_true")
    g.add_argument("--fetch", action="store_true")
    g.add_argument("--check-env", metavar="SITE")
    g.add_argument("--cpu-set", metavar="DIR")
    g.add_argument("--device-sim", metavar="DIR")
    g.add_argument("--device-venv", metavar="DIR")
    p.add_argument("--python", default=f"python{PYTHON}", help="--device-venv: a Python 3.12 interpreter")
    args = p.parse_args(argv)
    if args.verify:
        return verify()
    if args.fetch:
        return fetch()
    if args.check_env:
        return check_env(args.check_env)
    if args.cpu_set:
        return cpu_set(Path(args.cpu_set))
    if args.device_sim:
        return device_sim(Path(args.device_sim))
    if args.device_venv:
        return device_venv(Path(args.device_venv), args.python)
    write_lock()
    return verify()


if __name__ == "__main__":
    sys.exit(main())
