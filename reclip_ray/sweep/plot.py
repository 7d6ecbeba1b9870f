"""pareto.png: a sweep's trials against the compute they spent, and every trial's metric side by side."""

from __future__ import annotations

import math
from typing import Any

from reclip_ray.sweep.space import FINETUNE_FRACTION, Space

COLOURS = {"completed": "tab:blue", "stopped_early": "tab:gray", "error": "tab:red"}


def pareto_front(points: list[tuple[float, float]], mode: str = "max") -> list[int]:
    """Indices of points not dominated (less compute and better metric) by any other point, by compute."""
    sign = 1 if mode == "max" else -1
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def plot_sweep(rows: list[dict[str, Any]], space: Space, best: dict[str, Any] | None, out: str) -> None:
    """Left: metric vs training GFLOPs, Pareto front and best marked. Right: every trial's metric, labelled.

    With a GFLOPs budget all trials sit at (almost) the same x; the right panel is where schedules are compared.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [r for r in rows if not math.isnan(float(r["gflops_spent"])) and not math.isnan(float(r[space.metric]))]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110, gridspec_kw={"width_ratios": [1, 1.2]})
    _plot_compute(ax, kept, space, best)
    _plot_trials(bars, kept, space, best)
    fig.suptitle(f"sweep '{space.name}'" + (f" at {space.budget['gflops']:.0f} training GFLOPs per trial"
                                            if space.budget.get("gflops") else ""))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _plot_compute(ax: Any, kept: list[dict[str, Any]], space: Space, best: dict[str, Any] | None) -> None:
    pts = [(float(r["gflops_spent"]), float(r[space.metric])) for r in kept]
    for status, colour in COLOURS.items():
        xs = [float(r["gflops_spent"]) for r in kept if r["status"] == status]
        ys = [float(r[space.metric]) for r in kept if r["status"] == status]
        if xs:
            ax.scatter(xs, ys, c=colour, label=status.replace("_", " "), zorder=3)
    front = pareto_front(pts, space.mode)
    if front:
        fx, fy = zip(*[pts[i] for i in front])
        ax.step(fx, fy, where="post", c="tab:orange", lw=1.5, label="Pareto front", zorder=2)
    if best is not None:
        ax.scatter([float(best["gflops_spent"])], [float(best[space.metric])], s=160, facecolors="none",
                   edgecolors="tab:orange", lw=2, zorder=4, label=f"best: {_label(best)}")
    if space.budget.get("gflops"):
        ax.axvline(space.budget["gflops"], ls="--", c="k", lw=0.8, label="budget")
    ax.set_xlim(0, max([x for x, _ in pts] + [space.budget.get("gflops", 0)]) * 1.08 if pts else None)
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel("training GFLOPs spent")
    ax.set_ylabel(space.metric)
    ax.set_title("accuracy vs compute")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a sweep with no finished trial and no GFLOPs budget has nothing to name
        ax.legend(fontsize=7, loc="lower right")


def _plot_trials(bars: Any, kept: list[dict[str, Any]], space: Space, best: dict[str, Any] | None) -> None:
    order = sorted(kept, key=lambda r: float(r[space.metric]), reverse=space.mode == "max")
    labels = [f"{_label(r)} ({float(r['gflops_spent']):.0f} GF)" for r in order]
    values = [float(r[space.metric]) for r in order]
    cols = ["tab:orange" if best is not None and r is best else COLOURS.get(r["status"], "tab:blue") for r in order]
    bars.barh(range(len(order)), values, color=cols)
    bars.set_yticks(range(len(order)), labels, fontsize=7)
    bars.invert_yaxis()
    for i, v in enumerate(values):
        bars.text(v, i, f" {v:.3f}", va="center", fontsize=7)
    bars.set_xlabel(space.metric)
    bars.set_title("every trial (best first)")
    bars.grid(alpha=0.3, axis="x")


def _label(row: dict[str, Any]) -> str:
    return ", ".join(f"{k[6:].split('.')[-1] if k[6:] != FINETUNE_FRACTION else 'ft'}={v}"
                     for k, v in row.items() if k.startswith("param:"))
