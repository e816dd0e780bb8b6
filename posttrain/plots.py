"""PNG plots of training curves for each run directory (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display), imported when a plot is drawn: ~30 MiB of RSS
    that a stage would otherwise hold through its training from the moment it is imported."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict[str, list[tuple[float, float]]], out: str | Path, title: str = "") -> Path | None:
    """One panel per named curve of (step, value) points; returns the PNG path, or None if empty."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, axes = pyplot().subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, out)


def save_figure(fig, out: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file + rename) and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    pyplot().close(fig)
    tmp.replace(out)
    return out


def curves_from_log_history(log_history: list[dict], keys: list[str]) -> dict[str, list[tuple[float, float]]]:
    """Pick (step, value) series for `keys` out of a transformers Trainer log history."""
    return {k: [(e["step"], e[k]) for e in log_history if k in e] for k in keys}
