"""PNG scatter plots of 2-D point sets (matplotlib, Agg backend; no screen needed)."""

from __future__ import annotations

import numpy as np


def scatter_png(path: str, panels: list[tuple[str, np.ndarray]], *, lim: float | None = None,
                size: float = 3.2) -> None:
    """Write side-by-side scatter plots ``(title, (N, 2) array)`` to ``path``. Data of more than
    two dimensions is shown by its first two coordinates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if lim is None:
        everything = np.concatenate([p[:, :2] for _, p in panels])
        lim = float(np.percentile(np.abs(everything), 99.5)) * 1.1 + 1e-6
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
        y = points[:, 1] if points.shape[1] > 1 else np.zeros(len(points))
        ax.scatter(points[:, 0], y, s=1.0, alpha=0.5, linewidths=0, color="#1f4e9c")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
