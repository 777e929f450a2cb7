"""Continual-learning metrics over the accuracy matrix R (R[i][j]: task j after stage i, 0-based).

With T stages done and b_j the untrained model's accuracy on task j::

    ACC = mean_j R[T-1][j]                      over the tasks learned so far (all, once the run ends)
    BWT = mean_{i < T-1} R[T-1][i] - R[i][i]    negative = forgetting
    FWT = mean_{1 <= i < T} R[i-1][i] - b_i     the benefit of earlier stages to a task not yet trained

A metric with no terms (BWT/FWT after one stage) is None.
"""

from __future__ import annotations

from pathlib import Path


def cl_metrics(accuracy: list[list[float]], baseline: list[float]) -> dict:
    """ACC, BWT, FWT of the stages done so far (rows of `accuracy`)."""
    t = len(accuracy)
    if t == 0:
        return {"ACC": None, "BWT": None, "FWT": None}
    last = accuracy[-1]
    bwt = [last[i] - accuracy[i][i] for i in range(t - 1)]
    fwt = [accuracy[i - 1][i] - baseline[i] for i in range(1, min(t, len(baseline)))]
    return {"ACC": sum(last[:t]) / t, "BWT": _mean(bwt), "FWT": _mean(fwt)}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def format_table(tasks: list[str], accuracy: list[list[float | None]], baseline: list[float] | None,
                 summary: dict | None) -> str:
    """The matrix as text: one row for the untrained model (if given), one per stage; then ACC / BWT /
    FWT (if given). An entry not measured (None) shows as "-"."""
    width = max(12, *(len(t) + 2 for t in tasks))
    label_w = max(16, *(len(f"after {i + 1} {t}") + 2 for i, t in enumerate(tasks)))
    cell = lambda x: ("-" if x is None else f"{x:.3f}").rjust(width)  # noqa: E731
    lines = ["".ljust(label_w) + "".join(t.rjust(width) for t in tasks)]
    if baseline is not None:
        lines.append("untrained".ljust(label_w) + "".join(cell(x) for x in baseline))
    for i, row in enumerate(accuracy):
        lines.append(f"after {i + 1} {tasks[i]}".ljust(label_w) + "".join(cell(x) for x in row))
    if summary is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
        lines.append(f"ACC {summary['ACC']:.3f}   BWT {fmt(summary['BWT'])}   FWT {fmt(summary['FWT'])}"
                     f"   ({len(accuracy)}/{len(tasks)} stages)")
    return "\n".join(lines)


def heatmap(tasks: list[str], accuracy: list[list[float]], baseline: list[float], path: Path | None = None):
    """The matrix as a matplotlib figure (written to `path` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(tasks) + 2.5, 0.6 * (len(accuracy) + 1) + 1.5))
    im = draw_matrix(ax, tasks, accuracy, baseline, "accuracy (task j after stage i)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    if path is not None:
        save_png(fig, path)
    return fig


def draw_matrix(ax, tasks: list[str], accuracy: list[list[float]], baseline: list[float], title: str):
    """The untrained row and R[i][j] on `ax`, each cell labelled; returns the image (for a colorbar)."""
    rows = [baseline] + accuracy
    labels = ["untrained"] + [f"after {i + 1}: {t}" for i, t in enumerate(tasks[: len(accuracy)])]
    im = ax.imshow([[float("nan") if v is None else v for v in row] for row in rows], vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is None:
                continue
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=9)
    ax.set_title(title)
    return im


def save_png(fig, path: Path) -> None:
    """Write a figure as PNG atomically."""
    from io import BytesIO

    from . import atomic

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic.write_bytes(path, buf.getvalue())
