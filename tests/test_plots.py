"""Run plots (``simulations.plots``): the accuracy-vs-bytes figure has a log x axis whose tick labels do
not collide, and round 0 (0 bytes) is shown as a line, not as a point at x = 0."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import pytest

from simulations.plots import PLOTS, metric_figure, plot_runs


def _rows(per_round: float, start: float = 0.5) -> list[dict]:
    return [{"round": r, "accuracy": start + 0.05 * r, "cumulative-bytes": per_round * r} for r in range(6)]


def _visible_tick_labels(ax) -> list:
    ax.figure.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    return [t for t in ticks if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]


@pytest.mark.parametrize("runs", [
    {"fedsb": _rows(399_440)},                                  # the main job: 400 kB per round
    {"fedsb": _rows(39_944), "fedit": _rows(2.66e6, 0.52)},     # two runs, three decades apart
])
def test_bytes_axis_is_log_and_tick_labels_do_not_collide(runs):
    fig = metric_figure(runs, "cumulative-bytes", "bytes")
    ax = fig.axes[0]
    try:
        assert ax.get_xscale() == "log" and ax.get_xlim()[0] > 0
        ticks = _visible_tick_labels(ax)
        assert ticks
        assert all(t.label1.get_text() not in ("0", "$\\mathdefault{0}$") for t in ticks)
        boxes = [t.label1.get_window_extent() for t in ticks]
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)
        # round 0 is a horizontal line per run at its accuracy, not a data point
        points = [line for line in ax.get_lines() if line.get_marker() == "o"]
        assert all(min(line.get_xdata()) > 0 for line in points)
        round0 = sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
        assert round0 == sorted(rows[0]["accuracy"] for rows in runs.values())
    finally:
        plt.close(fig)


def test_round_axis_keeps_round_zero_and_files_are_written(tmp_path):
    fig = metric_figure({"fedsb": _rows(1000)}, "round", "round")
    try:
        assert fig.axes[0].get_xscale() == "linear"
        assert min(fig.axes[0].get_lines()[0].get_xdata()) == 0
    finally:
        plt.close(fig)
    paths = plot_runs({"fedsb": _rows(1000)}, tmp_path, title="t")
    assert [p.name for p in paths] == [name for _, name, _ in PLOTS]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_no_bytes_yet_gives_a_plain_axis():
    fig = metric_figure({"fedsb": [{"round": 0, "accuracy": 0.5, "cumulative-bytes": 0}]}, "cumulative-bytes", "b")
    try:
        assert fig.axes[0].get_xscale() == "linear"
    finally:
        plt.close(fig)
