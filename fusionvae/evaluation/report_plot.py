"""The metric-vs-K plot (``metrics_vs_k.png`` of an evaluation, the comparison plots of
``scripts/collect_results.py`` and the results page): one panel per metric, each marked with the
direction that is better, and y-limits that hold every point with its error bar."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from fusionvae.evaluation.metrics import IMAGE_METRICS
from fusionvae.evaluation.report import headers_for, metric_columns

# metrics with a better direction besides the image metrics (IMAGE_METRICS.higher_is_better);
# the others (kl, prior_sigma, diversity) are diagnostics
LOWER_IS_BETTER = ("nelbo", "iw_nll")
HIGHER_IS_BETTER = ("class_best", "class_mean")
MARKS = {"lower": "↓ lower is better", "higher": "↑ higher is better", None: "diagnostic (no better direction)"}


def better(column: str) -> str | None:
    """``"lower"`` / ``"higher"``: the direction in which ``column`` is better; None for a diagnostic."""
    if column in LOWER_IS_BETTER:
        return "lower"
    if column in HIGHER_IS_BETTER:
        return "higher"
    name, _, kind = column.rpartition("_")
    if name in IMAGE_METRICS and kind in ("best", "mean"):
        return "higher" if IMAGE_METRICS[name].higher_is_better else "lower"
    return None


def readable_limits(values: list[float], errors: list[float]) -> tuple[float, float] | None:
    """y-limits holding every value with its error bar (and a 5 % margin), spanning at least 2 % of
    the values' size so that a tiny change does not fill the panel; None without a finite value."""
    pairs = [(v, e if math.isfinite(e) else 0.0) for v, e in zip(values, errors) if math.isfinite(v)]
    if not pairs:
        return None
    low, high = min(v - abs(e) for v, e in pairs), max(v + abs(e) for v, e in pairs)
    size = max(abs(v) for v, _ in pairs)
    span = max(high - low, 0.02 * size, 1e-12)
    middle = (low + high) / 2
    return middle - 0.55 * span, middle + 0.55 * span


def metrics_figure(
    series: Mapping[str, list[Mapping]],
    units: str | None = None,
    errors: Mapping[str, list[Mapping]] | None = None,
    count: int | None = None,
):
    """The figure of ``plot_metrics_vs_k`` (matplotlib, Agg), not yet saved."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    columns = metric_columns([row for rows in series.values() for row in rows])
    headers = headers_for(units)
    ncols = min(4, max(1, len(columns)))
    nrows = max(1, -(-len(columns) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.9 * nrows), squeeze=False)
    for ax, col in zip(axes.flat, columns):
        values, bars = [], []
        for label, rows in series.items():
            err = {row["K"]: row.get(col, 0.0) for row in (errors or {}).get(label, [])}
            pts = [(row["K"], row[col], err.get(row["K"], 0.0)) for row in rows if col in row]
            if pts:
                ks, ys, es = zip(*pts)
                ax.errorbar(ks, ys, yerr=es, marker="o", capsize=3, label=label)
                values += ys
                bars += es
        limits = readable_limits(values, bars)
        if limits:
            ax.set_ylim(*limits)
        ax.set_title(f"{headers.get(col, col)}\n{MARKS[better(col)]}", fontsize=9)
        ax.set_xlabel("K (input views)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xticks(sorted({row["K"] for rows in series.values() for row in rows}))
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    if count:
        fig.suptitle(f"mean over {count} items; bars: standard error", fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(series) > 1 and handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * ((len(labels) - 1) // 4), 1, 1))
    else:
        fig.tight_layout()
    return fig


def plot_metrics_vs_k(
    series: Mapping[str, list[Mapping]],
    path: Path,
    units: str | None = None,
    errors: Mapping[str, list[Mapping]] | None = None,
    count: int | None = None,
) -> Path:
    """One panel per metric, metric against K, one line per entry of ``series`` (label -> rows),
    with standard-error bars from ``errors`` (label -> rows of the same shape) and the item count;
    each panel's title says whether lower or higher is better."""
    fig = metrics_figure(series, units, errors, count)
    import matplotlib.pyplot as plt  # after metrics_figure chose the Agg backend

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
