"""Pictures where people would rather look than read: the schedule of a static pass (steps x regions,
computed or reused) and calibrated MagCache magnitude ratios. matplotlib (the ``demo`` extra) draws
them; nothing is imported until a picture is asked for.

Example::

    from fxcache.demo.plots import plot_schedule
    plot_schedule(cached.plan(28, timesteps=pipe.scheduler.timesteps), "schedule.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_mag_ratios", "plot_schedule"]

COMPUTED_COLOR = "#1f5f99"
REUSED_COLOR = "#e8eef4"


def save_figure(figure, path, dpi: int | None = None) -> Path:
    """Write ``figure`` to ``path`` (its folder made if needed), close it, return the path.

    Example::

        save_figure(fig, "out/loss.png")
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("pictures need matplotlib: pip install 'fxcache[demo]'") from error
    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt

    return plt


def plot_schedule(schedule, path: str | Path, title: str | None = None) -> Path:
    """Draw a :class:`fxcache.schedule.Schedule` as a grid, one row per region and one column per
    step, dark where the region computes and light where it is reused or predicted; one panel per
    context when the contexts differ. Returns the path written.

    Example::

        plot_schedule(cached.plan(20, timesteps), "schedule.png", title="PAB, 20 steps")
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    same = all(schedule.computes[c] == schedule.computes[schedule.contexts[0]] for c in schedule.contexts)
    panels = schedule.contexts[:1] if same else schedule.contexts
    rows = len(schedule.regions)
    height = 1.2 + 0.32 * max(rows, 2) * len(panels)
    width = min(16.0, 3.0 + 0.28 * schedule.num_steps + 0.06 * max((len(r) for r in schedule.regions), default=0))
    figure, axes = plt.subplots(len(panels), 1, figsize=(width, height), squeeze=False)
    for axis, context in zip(axes[:, 0], panels):
        grid = [[1 if step[region] else 0 for step in schedule.computes[context]] for region in schedule.regions]
        axis.imshow(grid, aspect="auto", interpolation="nearest", vmin=0, vmax=1,
                    cmap=ListedColormap([REUSED_COLOR, COMPUTED_COLOR]))
        axis.set_yticks(range(rows), schedule.regions, fontsize=8)
        axis.set_xticks(range(schedule.num_steps), [str(i) for i in range(schedule.num_steps)], fontsize=7)
        # thin white lines between cells keep single steps readable
        axis.set_xticks([i - 0.5 for i in range(1, schedule.num_steps)], minor=True)
        axis.set_yticks([i - 0.5 for i in range(1, rows)], minor=True)
        axis.grid(which="minor", color="white", linewidth=1)
        axis.tick_params(which="minor", length=0)
        label = "denoising step"
        if schedule.timesteps:
            label += f" (timestep {schedule.timesteps[0]:.0f} \u2192 {schedule.timesteps[-1]:.0f})"
        axis.set_xlabel(label, fontsize=8)
        if not same:
            axis.set_title(f"context {context!r}", fontsize=9, loc="left")
    summary = ""
    if schedule.costs is not None:
        summary = f"predicted FLOPs executed: {schedule.fraction():.1%} of the uncached run"
    figure.suptitle("\n".join(t for t in (title, summary) if t), fontsize=10)
    figure.legend(handles=[Patch(color=COMPUTED_COLOR, label="computed"),
                           Patch(facecolor=REUSED_COLOR, edgecolor="#999999", label="reused / predicted")],
                  loc="lower right", fontsize=8, ncol=2, frameon=False)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(figure, path, dpi=120)


def plot_mag_ratios(ratios: Mapping[str, Sequence[float]], path: str | Path,
                    computes: Sequence[bool] | None = None, title: str | None = None) -> Path:
    """Draw measured magnitude ratios (one line per cache context) against the step, with the line
    ratio = 1 (the residual keeps its size) and, when ``computes`` (a MagCache schedule) is given,
    the steps it skips shaded. Returns the path written.

    Example::

        plot_mag_ratios({"cond": config.mag_ratios.tolist()}, "ratios.png", computes=config.schedule())
    """
    plt = _pyplot()

    figure, axis = plt.subplots(figsize=(8, 3.6))
    longest = max(len(values) for values in ratios.values())
    if computes is not None:
        skipped = [i for i, compute in enumerate(computes) if not compute]
        for n, step in enumerate(skipped):
            axis.axvspan(step - 0.5, step + 0.5, color="#f2c14e", alpha=0.35, linewidth=0,
                         label="skipped by MagCache" if n == 0 else None)
    axis.axhline(1.0, color="#888888", linewidth=0.8, linestyle="--")
    for context, values in ratios.items():
        axis.plot(range(len(values)), [float(v) for v in values], marker="o", markersize=3, label=context)
    axis.set_xlim(-0.5, longest - 0.5)
    axis.set_xlabel("denoising step")
    axis.set_ylabel(r"$\Vert r_t \Vert \,/\, \Vert r_{t-1} \Vert$")
    axis.legend(fontsize=8, frameon=False)
    axis.set_title(title or "MagCache magnitude ratios of the block stack's residual", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path, dpi=120)
