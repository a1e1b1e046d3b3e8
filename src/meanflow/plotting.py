"""Pictures: scatter plots of point sets, image grids, loss curves (matplotlib Agg and Pillow,
which matplotlib depends on; no screen needed)."""

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


def to_uint8(images) -> np.ndarray:
    """(N, C, H, W) values in [-1, 1] -> (N, H, W, C) uint8, ``round((x + 1) * 127.5)`` clipped;
    the ADM evaluator's layout. Arrays of other than 1 or 3 channels keep their first three,
    each image min-max scaled (a picture of latents, not a decoding)."""
    x = np.asarray(images, dtype=np.float32)
    if x.shape[1] not in (1, 3):
        x = x[:, :3]
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        x = (x - lo) / np.maximum(hi - lo, 1e-8) * 2 - 1
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(images, ncol: int, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (rows*(H+pad)+pad, ...) uint8 picture."""
    tiles = to_uint8(images)
    n, h, w, c = tiles.shape
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + k * (w + pad):pad + k * (w + pad) + w] = tile
    return grid[..., 0] if c == 1 else grid


def image_grid_png(path: str, images, ncol: int, scale: int = 1) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid of ``ncol`` columns, each pixel
    repeated ``scale`` times (nearest neighbour)."""
    from PIL import Image

    grid = image_grid(images, ncol)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(grid).save(path, format="PNG")


def loss_curve_png(path: str, records: list[dict], title: str = "") -> None:
    """Plot ``loss`` and ``mse`` of metrics.jsonl records against ``step`` (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for key, label in (("loss", "loss (adaptively weighted)"), ("mse", "squared error")):
        values = [r[key] for r in records]
        if values and all(v > 0 for v in values):
            ax.plot(steps, values, label=label, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
