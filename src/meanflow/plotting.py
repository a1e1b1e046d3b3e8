"""Pictures: scatter plots of point sets, image grids, loss curves (matplotlib Agg and Pillow,
which matplotlib depends on; no screen needed)."""

from __future__ import annotations

import textwrap

import numpy as np


def scatter_png(
    path: str, panels: list[tuple[str, np.ndarray]], *, lim: float | None = None, size: float = 3.2
) -> None:
    """Write side-by-side scatter plots ``(title, (N, D) array)`` to ``path``. Data of more than
    two dimensions is shown by its first two coordinates, and the panel says so ("dims 0 and 1
    of D", axes "dim 0" / "dim 1"); 1-D data is drawn along the x axis."""
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
        ax.set_title(title + _dims_note(points.shape[1]), fontsize=9)
        if points.shape[1] > 2:
            ax.set_xlabel("dim 0", fontsize=8)
            ax.set_ylabel("dim 1", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _dims_note(d: int) -> str:
    if d == 2:
        return ""
    return "\n(1-D data, drawn on a line)" if d == 1 else f"\n(dims 0 and 1 of {d})"


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
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + k * (w + pad) : pad + k * (w + pad) + w,
        ] = tile
    return grid[..., 0] if c == 1 else grid


def column_names(ncol: int, class_names, labels) -> list[str] | None:
    """The name over each of ``ncol`` grid columns, or None for no header. ``labels`` is the class
    of each image (filled row by row; None: unlabelled, no header); a column whose images all
    share one class is headed by its name in ``class_names`` (its number when that is None or
    too short) and a mixed column by nothing."""
    if labels is None:
        return None
    labels = [int(v) for v in np.asarray(labels).reshape(-1)]
    names = []
    for k in range(min(ncol, len(labels))):
        column = set(labels[k::ncol])
        one = column.pop() if len(column) == 1 else None
        names.append(
            ""
            if one is None
            else str(class_names[one])
            if class_names and one < len(class_names)
            else str(one)
        )
    return names if any(names) else None


def label_header(names: list[str], pitch: int, offset: int, width: int) -> np.ndarray:
    """A white (rows, width) uint8 strip with ``names[k]`` centred over the column starting at
    ``offset + k * pitch``; the font is the largest (7-14 px) that fits every name in ``pitch``,
    and names still too long are cut short with '.'."""
    from PIL import Image, ImageDraw, ImageFont

    room = max(pitch - 2, 1)
    size = 7
    for size in range(14, 6, -1):
        font = ImageFont.load_default(size=size)
        if all(font.getlength(n) <= room for n in names):
            break
    fitted = []
    for name in names:
        while len(name) > 1 and font.getlength(name) > room:
            name = name[:-2] + "."
        fitted.append(name)
    rows = size + size // 2 + 4
    strip = Image.new("L", (width, rows), 255)
    draw = ImageDraw.Draw(strip)
    for k, name in enumerate(fitted):
        x = offset + k * pitch + (pitch - font.getlength(name)) / 2
        draw.text((x, rows - 2), name, fill=0, font=font, anchor="ls")
    return np.asarray(strip)


def image_grid_png(
    path: str, images, ncol: int, scale: int = 1, *, class_names=None, labels=None, pad: int = 2
) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid of ``ncol`` columns, each pixel
    repeated ``scale`` times (nearest neighbour). With ``labels`` (N,) and ``class_names``, a strip
    of class names sits above the columns of one class each (:func:`column_names`); the pixels
    of the grid itself are unchanged."""
    from PIL import Image

    grid = image_grid(images, ncol, pad)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    names = column_names(max(1, min(ncol, len(images))), class_names, labels)
    if names:
        header = label_header(names, (images.shape[-1] + pad) * scale, pad * scale, grid.shape[1])
        if grid.ndim == 3:
            header = np.repeat(header[..., None], grid.shape[2], axis=2)
        grid = np.concatenate([header, grid])
    Image.fromarray(grid).save(path, format="PNG")


def smooth(values, window: int) -> np.ndarray:
    """Centred rolling median over ``window`` (odd) points: robust to single spikes and, unlike
    an EMA, without lag on the fast early drop. The half-width shrinks near the ends so each
    window stays centred (the first and last values are kept)."""
    x = np.asarray(values, dtype=np.float64)
    half = max(0, int(window) // 2)
    out = np.empty_like(x)
    for i in range(len(x)):
        h = min(half, i, len(x) - 1 - i)
        out[i] = np.median(x[i - h : i + h + 1])
    return out


MIN_RECORDS = 3  # fewer metrics.jsonl records than this: loss.png says the run is too short
LOSS_NOTE = (
    "Why this does not fall like a regression loss: the target u_tgt = v - (t-r) du/dt "
    "is built from the network itself (it moves as the field sharpens) and v = e - x is "
    "noisy given z_t, so the error has a floor of order D, the data's dimension. "
    "Judge quality by the samples (vector data: the first panel)."
)
ERR_TITLE = r"squared error $\|u - u_\mathrm{tgt}\|^2$ summed over dims (unweighted, 'mse')"
SWD_TITLE = "one-step samples (EMA) vs training data:\nsliced Wasserstein distance, lower is better"
FD_TITLE = (
    "one-step samples (EMA) vs training images:\n"
    "Frechet distance in the feature network's space, lower is better"
)
LOSS_TITLE = (
    r"loss = err / sg((err + c)$^p$), adaptively weighted"
    "\n"
    r"(what is minimised; about err$^{1-p}$, so near 1 for p = 1)"
)


def _curve(ax, steps, values, label: str, color: str) -> None:
    from matplotlib import ticker

    values = np.asarray(values, dtype=np.float64)
    window = 2 * (len(values) // 20) + 1  # about a tenth of the records, odd
    if window >= 3:
        ax.plot(
            steps,
            values,
            color=color,
            alpha=0.3,
            linewidth=0.8,
            label="per record (mean over log_every steps)",
        )
        ax.plot(
            steps,
            smooth(values, window),
            color=color,
            linewidth=2.0,
            label=f"rolling median of {window} records",
        )
        ax.legend(fontsize=7)
    else:
        ax.plot(steps, values, color=color, linewidth=1.5, marker="o", markersize=3)
    positive = values[values > 0]
    if len(positive) == len(values) and positive.max() > 10 * positive.min():
        ax.set_yscale("log")
        plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        if positive.max() < 300 * positive.min():  # label minor ticks over < 2.5 decades
            ax.yaxis.set_minor_formatter(plain)
        ax.set_ylabel("log scale", fontsize=7)
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7, which="both")
    ax.grid(alpha=0.3, which="both")


def loss_curve_png(path: str, records: list[dict], title: str = "") -> None:
    """Plot metrics.jsonl records against ``step``: the unweighted squared error ``mse`` (raw,
    faint, and smoothed, bold; log y when it spans more than a factor 10) and, in its own panel,
    the adaptively weighted ``loss`` unless it equals the error (``loss.p = 0``); a footnote says
    why neither falls like a regression loss. Fewer than :data:`MIN_RECORDS` records give a
    figure saying the run is too short for a curve, with the last record's values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["step"])
    if len(records) < MIN_RECORDS:
        fig = plt.figure(figsize=(5.5, 1.8))
        last = records[-1] if records else {}
        detail = (
            (
                f"\nlast: step {last['step']}, squared error {last.get('mse', np.nan):.4g}, "
                f"loss {last.get('loss', np.nan):.4g}"
            )
            if last
            else ""
        )
        fig.text(
            0.5,
            0.5,
            f"run too short for a loss curve ({len(records)} record"
            f"{'' if len(records) == 1 else 's'} in metrics.jsonl; one per log_every steps)"
            + detail,
            ha="center",
            va="center",
            fontsize=9,
        )
        if title:
            fig.suptitle(title, fontsize=9)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    steps = [r["step"] for r in records]
    mse = np.array([r["mse"] for r in records], dtype=np.float64)
    loss = np.array([r["loss"] for r in records], dtype=np.float64)
    same = np.allclose(loss, mse, rtol=1e-6, atol=0.0)
    key = "fd" if any("fd_1step" in r for r in records) else "swd"
    quality = [r for r in records if f"{key}_1step" in r]
    panels = (len(quality) >= MIN_RECORDS) + 1 + (not same)
    fig, grid = plt.subplots(1, panels, figsize=(1.0 + 5.2 * panels, 3.9), squeeze=False)
    axes = list(grid[0])
    if len(quality) >= MIN_RECORDS:
        ax = axes.pop(0)
        _curve(
            ax,
            [r["step"] for r in quality],
            [r[f"{key}_1step"] for r in quality],
            FD_TITLE if key == "fd" else SWD_TITLE,
            "#2a7d3a",
        )
        floor = quality[-1].get(f"{key}_floor")
        if floor is not None:
            ax.axhline(
                floor,
                color="#666666",
                linestyle="--",
                linewidth=1.0,
                label="floor: two sets of training points",
            )
            ax.legend(fontsize=7)
    _curve(
        axes[0],
        steps,
        mse,
        ERR_TITLE + ("\n= the loss (loss.p = 0: no adaptive weight)" if same else ""),
        "#1f4e9c",
    )
    if not same:
        _curve(axes[1], steps, loss, LOSS_TITLE, "#c2571a")
    if title:
        fig.suptitle(title, fontsize=10)
    note = textwrap.fill(LOSS_NOTE, int(fig.get_figwidth() * 21))
    fig.text(0.01, 0.01, note, fontsize=6.5, ha="left", va="bottom", color="#444444")
    fig.tight_layout(rect=(0, 0.03 * (note.count("\n") + 1), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
