"""Continual-learning metrics from an accuracy matrix, and their JSON / heatmap outputs.

``matrix[i][j]`` is the score on task j measured right after training task i (rows: when,
columns: which task). Entries for tasks not yet learned (j > i) are ``None``.

- OP (overall performance) = mean over tasks of the final row: mean_j matrix[T-1][j].
- BWT (backward transfer) = mean over the earlier tasks of how their score changed from
  when they were learned to the end: 1/(T-1) * sum_{j<T-1} (matrix[T-1][j] - matrix[j][j]).
  Negative BWT is forgetting. With a single task BWT is 0.

These are the TRACE benchmark's definitions, the ones SEEKR reports.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence


def _as_matrix(matrix) -> list:
    if hasattr(matrix, "tolist"):
        matrix = matrix.tolist()
    rows = [list(r) for r in matrix]
    T = len(rows)
    if T == 0:
        raise ValueError("matrix: is empty")
    for i, r in enumerate(rows):
        if len(r) != T:
            raise ValueError(f"matrix: must be square (T x T); row {i} has {len(r)} entries, T = {T}")
        for j in range(i + 1):
            v = r[j]
            if v is None or (isinstance(v, float) and math.isnan(v)):
                raise ValueError(f"matrix: entry [{i}][{j}] (task {j} after task {i}) is missing")
    return rows


def overall_performance(matrix) -> float:
    """OP: mean of the final row of a T x T accuracy matrix."""
    m = _as_matrix(matrix)
    last = m[-1]
    return float(sum(float(v) for v in last) / len(last))


def backward_transfer(matrix) -> float:
    """BWT: mean over tasks j < T-1 of matrix[T-1][j] - matrix[j][j] (0 for one task)."""
    m = _as_matrix(matrix)
    T = len(m)
    if T == 1:
        return 0.0
    return float(sum(float(m[-1][j]) - float(m[j][j]) for j in range(T - 1)) / (T - 1))


def summarize(matrix) -> dict:
    """{"OP", "BWT", "matrix"} with ``None`` for tasks not yet learned."""
    m = _as_matrix(matrix)
    clean = [[None if j > i else float(m[i][j]) for j in range(len(m))] for i in range(len(m))]
    return {"OP": overall_performance(m), "BWT": backward_transfer(m), "matrix": clean}


def partial_matrix(rows: Sequence[Sequence[float]], n_tasks: int) -> list:
    """Pad evaluation rows (row i holds tasks 0..i) to a T x T matrix of ``None``."""
    return [[(float(r[j]) if j < len(r) and j <= i else None) for j in range(n_tasks)]
            for i, r in enumerate(rows)] + \
        [[None] * n_tasks for _ in range(n_tasks - len(rows))]


def write_json(path: str, obj) -> None:
    """Write JSON atomically (temp file + rename): a reader never sees half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_heatmap(matrix, path: str, task_names: Sequence[str] | None = None, title: str = "",
                 vmin: float = 0.0, vmax: float = 1.0) -> str:
    """Draw the accuracy matrix as a heatmap PNG (rows: after task i; columns: task j)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    if hasattr(matrix, "tolist"):
        matrix = matrix.tolist()
    T = len(matrix)
    arr = np.full((T, T), np.nan)
    for i, r in enumerate(matrix):
        for j, v in enumerate(r):
            if v is not None:
                arr[i, j] = float(v)
    names = list(task_names) if task_names else [f"task {j}" for j in range(T)]
    fig, ax = plt.subplots(figsize=(1.2 * T + 2.2, 1.0 * T + 1.6))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=vmin, vmax=vmax)
    for i in range(T):
        for j in range(T):
            if not np.isnan(arr[i, j]):
                ax.text(j, i, f"{arr[i, j]:.2f}", ha="center", va="center",
                        color="white" if arr[i, j] < (vmin + vmax) / 2 else "black", fontsize=9)
    ax.set_xticks(range(T), names, rotation=30, ha="right")
    ax.set_yticks(range(T), [f"after {n}" for n in names])
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("trained up to")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def format_table(results: dict) -> str:
    """A plain-text table of {name: {"OP", "BWT"}} (scores shown in percent)."""
    names = list(results)
    w = max([len("method")] + [len(n) for n in names])
    lines = [f"{'method':<{w}}  {'OP':>7}  {'BWT':>7}", f"{'-' * w}  {'-' * 7}  {'-' * 7}"]
    for n in names:
        r = results[n]
        lines.append(f"{n:<{w}}  {100 * r['OP']:>6.1f}%  {100 * r['BWT']:>+6.1f}%")
    return "\n".join(lines)
