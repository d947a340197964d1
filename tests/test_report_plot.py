"""metrics_vs_k.png (fusionvae.evaluation.report_plot): every panel says which direction is better, and its
y-limits hold every error bar (read back from the drawn figure)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from fusionvae.evaluation.report_plot import (  # noqa: E402
    better,
    metrics_figure,
    plot_metrics_vs_k,  # noqa: E402
    readable_limits,
)

ROWS = [
    {"K": 0, "nelbo": 0.0, "psnr_best": 20.0, "mse_mean": 0.05, "kl": 3.0, "class_best": 0.5},
    {"K": 1, "nelbo": 10.0, "psnr_best": 20.1, "mse_mean": 0.04, "kl": 4.0, "class_best": 0.9},
]
# large errors at the extremes: the old limits (middle +- 0.6 x max(range, 4 x error)) cut them
ERRORS = [
    {"K": 0, "nelbo": 0.5, "psnr_best": 0.01, "mse_mean": 0.001, "kl": 0.1, "class_best": 0.01},
    {"K": 1, "nelbo": 3.0, "psnr_best": 0.9, "mse_mean": 0.02, "kl": 0.1, "class_best": 0.2},
]


def error_bar_extent(ax) -> tuple[float, float]:
    segments = [seg for container in ax.containers for seg in container.lines[2][0].get_segments()]
    ys = [y for seg in segments for _, y in seg]
    return min(ys), max(ys)


def test_panels_mark_the_better_direction_and_hold_their_error_bars():
    fig = metrics_figure(
        {"fusionvae": ROWS, "cvae": [{**r, "nelbo": r["nelbo"] + 1} for r in ROWS]},
        "nats",
        {"fusionvae": ERRORS},
        count=10,
    )
    try:
        panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.get_title()}
        marks = {name: ax.get_title().split("\n")[1] for name, ax in panels.items()}
        assert marks == {
            "NELBO (nats)": "↓ lower is better",
            "PSNR best": "↑ higher is better",
            "MSE mean": "↓ lower is better",
            "Class best": "↑ higher is better",
            "KL": "diagnostic (no better direction)",
        }
        for name, ax in panels.items():
            low, high = error_bar_extent(ax)
            bottom, top = ax.get_ylim()
            assert bottom < low and high < top, name
    finally:
        plt.close(fig)


def test_limits_keep_a_minimum_span_and_ignore_missing_values():
    bottom, top = readable_limits([100.0, 100.001], [0.0, 0.0])
    assert top - bottom == pytest.approx(0.02 * 100.001 * 1.1)  # a tiny change does not fill the panel
    assert readable_limits([float("nan")], [1.0]) is None
    assert readable_limits([1.0, 2.0], [float("nan"), 0.5]) == pytest.approx(
        (1.75 - 0.825, 1.75 + 0.825)
    )  # 1 .. 2.5, 10 % margin
    assert (better("nelbo"), better("ssim_mean"), better("mse_best"), better("diversity")) == (
        "lower",
        "higher",
        "lower",
        None,
    )


def test_the_report_writes_the_png(tmp_path):
    path = plot_metrics_vs_k({"m": ROWS}, tmp_path / "p.png", "nats", {"m": ERRORS}, 10)
    assert path.stat().st_size > 1000
