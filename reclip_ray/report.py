"""The end of a run: a console summary table and ``report.png``, both read from what the run already recorded.

The table is built from the metrics dict ``run_training`` returns (no extra I/O, so it cannot fail a finished run).
The figure is built from the MLflow history alone, so ``reclip-ray report RUN_DIR`` can redraw it for any run
later, including a resumed, a failed or a sweep trial's run, without the checkpoints or Ray.

Metric names (see ``train/worker.py``): per logged step ``loss``, ``gflops_total``, ``phase``, ``image_size``; at
each phase end ``eval/<size>px/<label set>/top1`` and ``.../chance_top1`` (zero-shot), and
``eval/<size>px/image_to_text_r@<k>`` / ``text_to_image_r@<k>`` (retrieval), at the phase's own resolution and at
full resolution. ``eval/full/...`` repeats the full-resolution ones under a size-free name (for sweeps).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from reclip_ray.errors import ReclipError

from reclip_ray.run_names import EVAL_ERROR, RUN_STATE_FILE
REPORT_PNG = "report.png"
RUN_DIR_TAG = "reclip.run_dir"

History = Mapping[str, Sequence[tuple[int, float]]]

_TOP1 = re.compile(r"^eval/(\d+)px/(.+)/top1$")
_RETRIEVAL = re.compile(r"^(image_to_text|text_to_image)_r@(\d+)$")


# ---------------------------------------------------------------------------------------------------- console table


def _eval_prefix(metrics: Mapping[str, Any], full_size: int) -> str | None:
    """``eval/<full>px/`` if the run evaluated at full size, else the size-free ``eval/full/`` view, else None."""
    for prefix in (f"eval/{full_size}px/", "eval/full/"):
        if any(k.startswith(prefix) for k in metrics):
            return prefix
    return None


def _label_sets(metrics: Mapping[str, Any], prefix: str) -> list[str]:
    """Label-set names with a top-1 under ``prefix``, in the order they were reported."""
    return [k[len(prefix):-len("/top1")] for k in metrics
            if k.startswith(prefix) and k.endswith("/top1") and not k.endswith("/chance_top1")]


def _retrieval_ks(metrics: Mapping[str, Any], prefix: str) -> list[int]:
    """The k of every R@k logged under ``prefix`` (1, 5, 10 today), ascending."""
    ks = {int(m.group(2)) for k in metrics if k.startswith(prefix) and (m := _RETRIEVAL.match(k[len(prefix):]))}
    return sorted(ks)


def _pct(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if _is_number(value) else "-"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def format_duration(seconds: float) -> str:
    """``1h 02m 03s`` / ``4m 05s`` / ``12.3s``: a wall time a person reads at a glance."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def format_gflops(gflops: float) -> str:
    """GFLOPs with thousands separators, plus the PFLOPs figure once the number gets too long to read."""
    text = f"{gflops:,.1f} GFLOPs"
    return f"{text} ({gflops / 1e6:,.2f} PFLOPs)" if gflops >= 1e6 else text


def _grid(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Left-align the first column, right-align the numbers: a fixed-width block without a table library."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            .rstrip() for r in rows]


def _zero_shot_lines(metrics: Mapping[str, Any], prefix: str, size: str) -> list[str]:
    sets = _label_sets(metrics, prefix)
    if not sets:
        return []
    rows = [["label set", "top-1", "chance", "x chance"]]
    for name in sets:
        top1, chance = metrics.get(f"{prefix}{name}/top1"), metrics.get(f"{prefix}{name}/chance_top1")
        ratio = f"{float(top1) / float(chance):.1f}x" if _is_number(top1) and _is_number(chance) and chance else "-"
        rows.append([name, _pct(top1), _pct(chance), ratio])
    return [f"zero-shot classification at {size}:", *_grid(rows)]


def _retrieval_lines(metrics: Mapping[str, Any], prefix: str, size: str) -> list[str]:
    ks = _retrieval_ks(metrics, prefix)
    if not ks:
        return []
    rows = [["direction", *(f"R@{k}" for k in ks)]]
    for key, name in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        rows.append([name, *(_pct(metrics.get(f"{prefix}{key}_r@{k}")) for k in ks)])
    return [f"retrieval at {size}:", *_grid(rows)]


def summary_table(
    metrics: Mapping[str, Any],
    *,
    wall_s: float,
    run_dir: str,
    mlflow_run_id: str,
    tracking_uri: str,
    full_size: int,
    report_png: str | None = None,
) -> str:
    """What a person wants to see when ``reclip-ray train`` ends: how good, at what cost, and where things are.

    Accuracy is shown next to its chance level because on small or synthetic eval sets a raw top-1 means little by
    itself ("3.2x chance" says the model learned something; "1.0x" says it did not). ``wall_s`` is the time the
    command took; ``report_png`` (optional) is where report.png was drawn.
    """
    from reclip_ray import storage

    prefix = _eval_prefix(metrics, full_size)
    size = f"{full_size}px" if prefix == f"eval/{full_size}px/" else "full resolution"
    lines = ["reclip-ray: run finished", ""]
    body = (_zero_shot_lines(metrics, prefix, size) + _retrieval_lines(metrics, prefix, size)) if prefix else []
    lines += body or [_no_evaluation(metrics.get(EVAL_ERROR))]
    gflops = metrics.get("gflops_total")
    facts = [
        ["train compute", format_gflops(float(gflops)) if _is_number(gflops) else "-"],
        ["wall time", format_duration(wall_s)],
        ["model", storage.join(run_dir, "model")],
        *([["report", report_png]] if report_png else []),
        ["MLflow run", str(mlflow_run_id)],
        ["browse it", f"mlflow ui --backend-store-uri {tracking_uri}"],
    ]
    width = max(len(k) for k, _ in facts)
    lines += [""] + [f"{k.ljust(width)}  {v}" for k, v in facts]
    return "\n".join(lines)


def _no_evaluation(reason: str | None) -> str:
    """The table's line for a final model without an evaluation: the run's reason where it gave one."""
    if not reason:
        return "no evaluation (data.eval empty, eval.at_phase_end=false, or the evaluation failed)"
    return reason if reason.startswith("no evaluation") else f"no evaluation of the final model: {reason}"


# ---------------------------------------------------------------------------------------------------- history


def _dedup(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """One value per step, ascending; a later entry for the same step wins (a resumed run re-logging an eval)."""
    return sorted(dict(points).items())


def fetch_history(tracking_uri: str, run_id: str) -> tuple[dict[str, list[tuple[int, float]]], dict[str, str]]:
    """Every metric's history of the run (one value per step) and its params, read once from MLflow.

    The key list comes from the run's latest metrics, so eval metrics of any label set or size are found without
    knowing the config.
    """
    from reclip_ray import tracking

    c = tracking.client(tracking_uri)
    run = c.get_run(run_id)
    history: dict[str, list[tuple[int, float]]] = {}
    for key in run.data.metrics:
        entries = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        history[key] = _dedup([(m.step, m.value) for m in entries])
    return history, dict(run.data.params)


def value_at(points: Sequence[tuple[int, float]], step: int) -> float | None:
    """The value logged at ``step``, else the last one before it (None if nothing was logged by then).

    The worker always logs the last step of a phase, where evaluation happens, so for phase-end steps this is exact.
    """
    best = None
    for s, v in points:
        if s > step:
            break
        best = v
    return best


def phase_switches(history: History, names: Mapping[int, str] | None = None) -> list[tuple[float, str]]:
    """``(GFLOPs, label)`` at every change of ``phase`` in the history: where the vertical lines go.

    The x is ``gflops_total`` at the last logged step of the phase that ended: the worker always logs a phase's
    last step, so that is exactly the compute spent when the switch happened (the first logged step of the next
    phase can be ``train.log_every_steps`` later). The label names the phase that starts and its resolution.
    """
    phases = _dedup(history.get("phase", []))
    gflops = _dedup(history.get("gflops_total", []))
    sizes = _dedup(history.get("image_size", []))
    out: list[tuple[float, str]] = []
    for (prev_step, prev), (step, cur) in zip(phases, phases[1:]):
        if int(cur) == int(prev):
            continue
        x = value_at(gflops, prev_step)
        if x is None:
            continue
        out.append((float(x), _phase_label(int(cur), value_at(sizes, step), names)))
    return out


def _phase_label(index: int, size: float | None, names: Mapping[int, str] | None) -> str:
    name = (names or {}).get(index)
    what = f"phase {index}" + (f" '{name}'" if name else "")
    return what + (f" {int(size)}px" if size is not None else "")


def _phase_names(params: Mapping[str, str]) -> dict[int, str]:
    """Phase names from the flattened config params (``phases.0.name``), for nicer labels."""
    out: dict[int, str] = {}
    for k, v in params.items():
        m = re.match(r"^phases\.(\d+)\.name$", k)
        if m:
            out[int(m.group(1))] = v
    return out


def full_size_of(params: Mapping[str, str], history: History) -> int | None:
    """The run's full resolution: ``eval.full_image_size`` if set, else the last phase's ``image_size``.

    From params (the config as run), falling back to the last logged ``image_size`` for runs logged without them.
    """
    try:
        if int(float(params.get("eval.full_image_size", "0"))) > 0:
            return int(float(params["eval.full_image_size"]))
        last = max((int(m.group(1)) for k in params if (m := re.match(r"^phases\.(\d+)\.image_size$", k))), default=None)
        if last is not None:
            return int(float(params[f"phases.{last}.image_size"]))
    except ValueError:
        pass
    sizes = _dedup(history.get("image_size", []))
    return int(sizes[-1][1]) if sizes else None


def _zero_shot_series(history: History, full_size: int | None) -> dict[str, dict[str, Any]]:
    """Per label set: full-resolution top-1 points, phase-resolution top-1 points, and the chance level.

    A point's x is the GFLOPs at the eval step. The phase-resolution point of a phase end is the one measured at the
    image size that phase trained at (read from the ``image_size`` history at that step).
    """
    gflops = _dedup(history.get("gflops_total", []))
    sizes = _dedup(history.get("image_size", []))
    out: dict[str, dict[str, Any]] = {}
    for key, points in history.items():
        m = _TOP1.match(key)
        if not m or key.endswith("/chance_top1"):
            continue
        size, name = int(m.group(1)), m.group(2)
        series = out.setdefault(name, {"full": [], "phase": [], "chance": None})
        chance = history.get(f"eval/{size}px/{name}/chance_top1")
        if chance:
            series["chance"] = chance[-1][1]
        for step, value in points:
            x = value_at(gflops, step)
            if x is None:
                continue
            if size == full_size:
                series["full"].append((x, value))
            trained_at = value_at(sizes, step)
            if trained_at is not None and int(trained_at) == size:
                series["phase"].append((x, value, size))
    for series in out.values():
        series["full"].sort()
        series["phase"].sort()
    return out


# ---------------------------------------------------------------------------------------------------- figure


def draw_report(tracking_uri: str, run_id: str, out_png: str) -> str:
    """Draw ``report.png`` for one MLflow run: loss vs compute (left), zero-shot top-1 vs compute (right).

    Both x axes are cumulative training GFLOPs, the currency RECLIP trades in: the cheap low-resolution phase and
    the short full-resolution finetune then take the width they cost, not the width of their step counts.
    """
    history, params = fetch_history(tracking_uri, run_id)
    if not history.get("loss") or not history.get("gflops_total"):
        raise ReclipError(f"MLflow run {run_id} has no logged training steps (loss, gflops_total) to draw")
    full = full_size_of(params, history)
    switches = phase_switches(history, _phase_names(params))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + the Agg canvas directly (not pyplot): no global backend state, safe next to other plotting code.
    fig = Figure(figsize=(12, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    _draw_loss(loss_ax, history)
    _draw_zero_shot(acc_ax, history, full)
    for ax in (loss_ax, acc_ax):
        _draw_switches(ax, switches)
        ax.set_xlabel("training GFLOPs (cumulative)")
        ax.ticklabel_format(axis="x", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    run_name = params.get("run.name") or run_id
    fig.suptitle(f"reclip-ray run '{run_name}'  ({run_id})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out_png)


def _draw_loss(ax: Any, history: History) -> None:
    gflops = _dedup(history["gflops_total"])
    pts = [(x, v) for s, v in _dedup(history["loss"]) if (x := value_at(gflops, s)) is not None]
    ax.plot([x for x, _ in pts], [v for _, v in pts], c="tab:blue", lw=1.2)
    ax.set_ylabel("training loss")
    ax.set_title("loss vs compute")


def _draw_zero_shot(ax: Any, history: History, full: int | None) -> None:
    series = _zero_shot_series(history, full)
    ax.set_ylabel("zero-shot top-1")
    ax.set_title(f"zero-shot top-1 at phase ends (solid: {full}px, dashed: the phase's own size)"
                 if full else "zero-shot top-1 at phase ends", fontsize=9)
    if not series:
        ax.text(0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    colours = [f"C{i}" for i in range(10)]
    for i, (name, s) in enumerate(sorted(series.items())):
        c = colours[i % len(colours)]
        if s["full"]:
            ax.plot(*zip(*s["full"]), c=c, marker="o", lw=1.5, label=f"{name} ({full}px)" if full else name)
        low = [(x, v, size) for x, v, size in s["phase"] if size != full]
        if low:
            ax.plot([x for x, _, _ in low], [v for _, v, _ in low], c=c, marker="s", ls="--", lw=1,
                    label=f"{name} (phase size)")
            for x, v, size in low:
                ax.annotate(f"{size}px", (x, v), textcoords="offset points", xytext=(4, -10), fontsize=7, color=c)
        if s["chance"] is not None:
            ax.axhline(s["chance"], c=c, ls=":", lw=1, label=f"{name} chance ({100 * s['chance']:.1f}%)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="best")


def _draw_switches(ax: Any, switches: Sequence[tuple[float, str]]) -> None:
    """A vertical line at each phase switch, labelled along the line at the top of the panel."""
    for x, label in switches:
        ax.axvline(x, c="k", ls="-.", lw=0.8, alpha=0.6)
        ax.text(x, 0.98, f" {label}", rotation=90, va="top", ha="right", fontsize=7,
                transform=ax.get_xaxis_transform())


def _save(fig: Any, local_png: str) -> str:
    """Write atomically (temp file + rename): a reader never sees half a PNG. A local file (a remote run folder's
    report is drawn locally and copied up by the caller)."""
    out = Path(local_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out)
    return str(out)


# ---------------------------------------------------------------------------------------------------- finding the run


def _read_state(run_dir: str) -> dict[str, Any] | None:
    from reclip_ray import storage

    path = storage.join(run_dir, RUN_STATE_FILE)
    try:
        state = storage.read_json(path)
    except (OSError, ValueError) as exc:
        raise ReclipError(f"{path}: unreadable ({exc})") from None
    if state is None:
        return None
    if not isinstance(state, dict) or not state.get("mlflow_run_id"):
        raise ReclipError(f"{path}: no mlflow_run_id in it")
    return state


def _check_store(uri: str) -> None:
    """A SQLite URI naming a missing file would make MLflow create an empty database there: refuse instead."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReclipError(f"no MLflow database at {uri[len('sqlite:///'):]} (pass --tracking-uri or set MLFLOW_TRACKING_URI)")


def _run_exists(uri: str, run_id: str) -> bool:
    """Whether the store has the run. A store that does not answer (a server down) is an error that says so: read
    as "not found", the run would seem lost."""
    from reclip_ray import tracking

    return tracking.find_run(uri, run_id, f"could not read run {run_id}") is not None


def _search_by_tag(uri: str, run_dir: str) -> str | None:
    """The newest run tagged ``reclip.run_dir`` = this folder (as given, absolute, or with symlinks resolved)."""
    from mlflow.entities import ViewType

    from reclip_ray import tracking

    c = tracking.client(uri)
    exp_ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    if not exp_ids:
        return None
    from reclip_ray import storage

    candidates = dict.fromkeys([storage.normalize(run_dir)] if storage.is_uri(run_dir) else
                               [os.path.abspath(run_dir), os.path.realpath(run_dir)])
    for cand in candidates:
        if "'" in cand:  # MLflow's filter grammar has no escape for quotes: filter in Python instead
            runs = [r for r in tracking.search_all_runs(c, exp_ids, run_view_type=ViewType.ALL,
                                                         order_by=["attributes.start_time DESC"])
                    if r.data.tags.get(RUN_DIR_TAG) == cand]
        else:
            runs = c.search_runs(exp_ids, filter_string=f"tags.`{RUN_DIR_TAG}` = '{cand}'",
                                 run_view_type=ViewType.ALL, order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            return runs[0].info.run_id
    return None


def find_run(run_dir: str, tracking_uri: str | None = None) -> tuple[str, str]:
    """``(tracking_uri, run_id)`` of the MLflow run that trained ``run_dir``.

    First the launcher's ``reclip_run.json`` in the folder (its URI, unless ``tracking_uri`` overrides it, e.g. a
    database that moved); else a run tagged ``reclip.run_dir`` with this folder in ``tracking_uri``,
    ``$MLFLOW_TRACKING_URI`` or ``./mlflow.db``.
    """
    from reclip_ray import storage, tracking

    folder = storage.normalize(run_dir)
    if not storage.exists(folder):
        raise ReclipError(f"run folder not found: {run_dir}")
    state = _read_state(folder)
    if state is not None:
        uri = tracking.resolve_tracking_uri(tracking_uri or state.get("tracking_uri", ""))
        _check_store(uri)
        run_id = str(state["mlflow_run_id"])
        if not _run_exists(uri, run_id):
            raise ReclipError(f"MLflow run {run_id} (from {storage.join(folder, RUN_STATE_FILE)}) not found in {uri}")
        return uri, run_id
    uri = tracking.resolve_tracking_uri(tracking_uri or "")
    _check_store(uri)
    run_id = _search_by_tag(uri, folder)
    if run_id is None:
        raise ReclipError(f"{run_dir}: no {RUN_STATE_FILE} and no MLflow run tagged {RUN_DIR_TAG}={folder} "
                          f"in {uri} (pass --tracking-uri?)")
    return uri, run_id


def report_run(run_dir: str, tracking_uri: str | None = None) -> str:
    """``reclip-ray report RUN_DIR``: draw RUN_DIR/report.png from the run's MLflow history, attach it to the run."""
    uri, run_id = find_run(run_dir, tracking_uri)
    return _draw_into_run_dir(run_dir, uri, run_id)


def report_after_training(run_dir: str, tracking_uri: str, run_id: str) -> str | None:
    """The launcher's end-of-run hook: report.png in the run folder and in MLflow; never fails the finished run.

    The training is done and saved by the time this runs, so a plotting problem is a warning, not an error.
    """
    import sys

    try:
        return _draw_into_run_dir(run_dir, tracking_uri, run_id)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        print(f"[reclip] WARNING: could not draw {REPORT_PNG}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return None


def _draw_into_run_dir(run_dir: str, tracking_uri: str, run_id: str) -> str:
    """Draw report.png, log it to MLflow and put it in the run folder (a local folder or a URI: one PUT there)."""
    import tempfile

    from reclip_ray import storage, tracking

    target = storage.join(storage.normalize(run_dir), REPORT_PNG)
    if not storage.is_uri(target):
        out = draw_report(tracking_uri, run_id, target)
        tracking.log_artifact(tracking_uri, run_id, out)
        return out
    with tempfile.TemporaryDirectory(prefix="reclip-report-") as tmp:
        out = draw_report(tracking_uri, run_id, os.path.join(tmp, REPORT_PNG))
        tracking.log_artifact(tracking_uri, run_id, out)
        with open(out, "rb") as f:
            storage.write_bytes(target, f.read())
    return target
