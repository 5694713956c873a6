"""Drawing a sweep: error against file size (log scales), Pareto front highlighted.

Needs matplotlib (the `plot` extra); it is imported only here, and the Agg
canvas is used directly so no display or global backend is involved.
"""

from __future__ import annotations

from pathlib import Path

from modelpress.app.sweep import SweepReport
from modelpress.formats.atomic import atomic_path


def plot_sweep(report: SweepReport, path: Path) -> None:
    """Write a PNG of every setting that ran: size (x) against error (y)."""
    # matplotlib: an optional extra (`plot`), and 0.3+ s to import
    from matplotlib.figure import Figure

    rows = [r for r in report.ran if r.tensors]  # a setting that changed nothing is no point
    use_output = report.front_metric == "output error"
    points = [(r.file_bytes, r.output_error if use_output else r.weight_error.rel_l2)
              for r in rows]
    positive = [e for _, e in points if e and e > 0]
    # Log scales cannot show 0 error: such points sit at a floor below the smallest error.
    floor = min(positive) / 10 if positive else 1e-6
    points = [(s, e if e and e > 0 else floor) for s, e in points]

    figure = Figure(figsize=(8, 5.5), dpi=110)
    ax = figure.add_subplot()
    others = [p for p, r in zip(points, rows) if not r.on_front]
    front = sorted(p for p, r in zip(points, rows) if r.on_front)
    if others:
        ax.scatter(*zip(*others), color="0.6", label="setting", zorder=2)
    if front:
        ax.plot(*zip(*front), color="tab:red", marker="o", linewidth=1.5, drawstyle="steps-post",
                label="Pareto front", zorder=3)
    for i, ((size, error), row) in enumerate(zip(points, rows)):
        # Alternate label sides so settings of nearly equal size stay readable.
        ax.annotate(row.name, (size, error), textcoords="offset points",
                    xytext=(5, 4) if i % 2 == 0 else (5, -11),
                    fontsize=8, color="tab:red" if row.on_front else "0.3")
    ax.axvline(report.file_bytes, color="0.4", linestyle="--", linewidth=1,
               label=f"original ({report.file_bytes:,} bytes)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("file size on disk (bytes)")
    ax.set_ylabel(f"{report.front_metric} (relative L2)")
    ax.set_title(f"modelpress sweep: {Path(report.model).name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    with atomic_path(Path(path)) as tmp:
        figure.savefig(str(tmp), format="png")
