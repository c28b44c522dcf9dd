"""Figure helpers with arithmetic of their own: smoothing, the simplex, the LISA viewer."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np

from scalebio_core.lab.plots import (
    plot_memory_check,
    plot_memory_vs_size,
    plot_method_losses,
    plot_simplex,
    simplex_grid,
    simplex_xy,
    smooth,
)
from scalebio_core.lab.widgets import lisa_viewer


def test_smooth_is_a_centred_moving_average():
    y = np.array([0.0, 0, 0, 9, 0, 0, 0])
    s = smooth(y, 3)
    assert s.shape == y.shape and np.allclose(s, [0, 0, 3, 3, 3, 0, 0])  # no lag: peak stays put
    assert np.allclose(smooth(np.arange(6.0), 3), [0.5, 1, 2, 3, 4, 4.5])  # fewer at the ends
    assert np.allclose(smooth(y, 1), y)


def test_simplex_grid_and_coordinates():
    g = simplex_grid(4)
    assert len(g) == 15 and np.allclose(g.sum(1), 1) and (g >= 0).all()
    corners = simplex_xy(np.eye(3))
    assert np.allclose(corners, [[0, 0], [1, 0], [0.5, np.sqrt(3) / 2]])
    assert np.allclose(simplex_xy([1 / 3, 1 / 3, 1 / 3]), corners.mean(0))  # centre to centroid
    fig, ax = plt.subplots()
    plot_simplex(ax, g, ((g - 0.2) ** 2).sum(1), ["a", "b", "c"], "test")
    assert [t.get_text() for t in ax.texts] == ["a", "b", "c"]
    plt.close(fig)


def test_lisa_viewer_names_the_blocks_and_the_trained_share(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": t, "p": {"a": 1.0}, "lisa_w": [t % 4], "lisa_u": [3]} for t in range(6)]
    (run / "trajectory.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    box = lisa_viewer({"LISA 1": run}, n_blocks=4, block_params=10, total_params=100)
    controls, label, image = box.children
    pick, slider = controls.children
    assert "w trains blocks [0]" in label.value and "70 of 100 parameters, 70%" in label.value
    slider.value = 5
    assert (
        "<b>step 5</b>: w trains blocks [1]" in label.value and "u trains blocks [3]" in label.value
    )
    assert image.value[:4] == b"\x89PNG"


def test_memory_check_pairs_each_prediction_with_its_measurements_in_one_colour():
    fig, ax = plt.subplots(1, 2)
    sizes = {"a/small": 1e8, "b/large": 1e10}
    plot_memory_vs_size(ax[0], sizes, {"full": [1.0, 20.0], "LISA": [0.8, 12.0]})
    plot_memory_check(
        ax[1],
        [1e6, 1e7],
        {"full": [60, 500], "LISA": [50, 370]},
        {"full": [25, 480], "LISA": [20, 335]},
    )
    lines = {ln.get_label(): ln for ln in ax[1].get_lines()}
    assert list(lines) == ["full: predicted", "full: measured", "LISA: predicted", "LISA: measured"]
    assert list(lines["full: measured"].get_ydata()) == [60, 500]
    assert lines["full: measured"].get_linestyle() == "None"  # markers only, on the line
    for mode, left in zip(("full", "LISA"), ax[0].get_lines()):  # the panels share colours
        assert lines[f"{mode}: predicted"].get_color() == left.get_color()
        assert lines[f"{mode}: measured"].get_markeredgecolor() == left.get_color()
    plt.close(fig)


def test_method_dots_keep_an_accuracy_bar_inside_zero_and_one():
    fig, ax = plt.subplots()
    summary = [
        {
            "method": "scalebio",
            "acc_mean": 0.01,
            "acc_std": 0.03,
            "loss_mean": 2.0,
            "loss_std": 0.5,
        },
        {"method": "uniform", "acc_mean": 0.99, "acc_std": 0.05, "loss_mean": 2.5, "loss_std": 0.1},
    ]
    plot_method_losses(ax, summary, key="acc")
    bars = [c.get_segments()[0] for c in ax.collections]  # one vertical bar a method
    assert np.allclose([b[:, 1] for b in bars], [[0.0, 0.04], [0.94, 1.0]])
    ax.clear()
    plot_method_losses(ax, summary, key="loss")  # a loss bar is the plain ± std
    bars = [c.get_segments()[0] for c in ax.collections]
    assert np.allclose([b[:, 1] for b in bars], [[1.5, 2.5], [2.4, 2.6]])
    plt.close(fig)
