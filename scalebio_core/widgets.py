"""ipywidgets dashboards reused by the notebooks (no training logic of their own)."""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np

from .plots import plot_loglog, plot_weights
from .toy import least_squares
from .toy_runs import run_toy


def toy_explorer(
    steps: int = 1000, noise: float = 1.0, alpha: float = 100.0, lr_lam: float = 2.0
) -> W.VBox:
    """Sliders for alpha, tau, lr_lam and the noise of the last least-squares source.

    Each change reruns ScaleBiO on toy (a) and redraws p against the exact optimum p* and the
    log-log error ‖p_t − p*‖_∞ against steps.
    """
    s_alpha = W.FloatLogSlider(value=alpha, base=10, min=0, max=3, step=0.25, description="α")
    s_tau = W.FloatSlider(
        value=1.0, min=1.0, max=1.01, step=0.001, readout_format=".3f", description="τ"
    )
    s_lr = W.FloatLogSlider(value=lr_lam, base=10, min=-2, max=0.5, step=0.1, description="lr_λ")
    s_noise = W.FloatSlider(value=noise, min=0.0, max=5.0, step=0.25, description="noise")
    out = W.Output()
    status = W.HTML()

    def redraw(*_):
        problem = least_squares(noise=(0.1, 0.1, 0.1, s_noise.value))
        run = run_toy(problem, s_alpha.value, steps, s_lr.value, tau=s_tau.value)
        err = run.p_err
        status.value = (
            f"final ‖p − p*‖∞ = {err[-1]:.2e}; relative F gap = "
            f"{run.f_err()[-1]:.2e}; final α = {run.result.trajectory['alpha'][-1]:g}"
        )
        with out:
            out.clear_output(wait=True)
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
            plot_weights(
                axes[0],
                run.p,
                problem.names,
                run.p_star,
                title="p against steps (dashed: exact p*)",
            )
            x = np.arange(1, len(err))
            plot_loglog(
                axes[1],
                {"‖p_t − p*‖∞": (x, err[1:])},
                "step",
                "error",
                "Distance to the exact optimum",
            )
            plt.show()

    for s in (s_alpha, s_tau, s_lr, s_noise):
        s.continuous_update = False
        s.observe(redraw, names="value")
    box = W.VBox([W.HBox([s_alpha, s_tau]), W.HBox([s_lr, s_noise]), status, out])
    redraw()
    return box


__all__ = ["toy_explorer"]
