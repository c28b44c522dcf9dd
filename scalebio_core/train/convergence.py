"""Whether a run's weights have settled: the convergence verdict of its trajectory
(verdict.json), said when a run ends."""

from __future__ import annotations

from typing import Any

import numpy as np

VERDICT = "verdict.json"
SETTLED_SHARE, UNMOVED, MIN_STEPS, DRIFT_Z = 0.1, 0.01, 40, 3.0


def _lam_grads(rows: list[dict], p: np.ndarray, names: list[str]) -> tuple[list, Any, Any]:
    """λ's gradient α·(diag(p) − p pᵀ)(l̄(w) − l̄(u)) at each of `rows` (ScaleBiO rows), its mean
    norm, and the drift: the largest |mean| / standard error of one source's gradient (None
    under 3 rows)."""
    grads: list[np.ndarray] = []
    for r, q in zip(rows, p):
        if "loss_w" in r and "loss_u" in r:
            w, u = (
                [r[key][n] for n in names] if isinstance(r[key], dict) else r[key]
                for key in ("loss_w", "loss_u")
            )
            d = np.asarray(w, float) - np.asarray(u, float)
            grads.append(r["alpha"] * q * (d - q @ d))
    grad = float(np.mean([np.linalg.norm(g) for g in grads])) if grads else None
    drift = None
    if len(grads) >= 3:
        g = np.asarray(grads)
        se = g.std(0, ddof=1) / np.sqrt(len(g))
        drift = float(np.max(np.abs(g.mean(0)) / np.maximum(se, 1e-30)))
    return grads, grad, drift


def convergence(rows: list[dict], tail: float = 0.25) -> dict[str, Any]:
    """Whether the weights p of a run have settled, from its trajectory rows.

    Measured over the last `tail` of the steps: how far p moved there (the largest change of one
    weight), per 100 steps, against its whole move from the first step; and the mean norm of λ's
    gradient α·(diag(p) − p pᵀ)(l̄(w) − l̄(u)) there (ScaleBiO rows; None otherwise). The verdict:
    "too short" under 40 steps; "not moved" when p never moved more than 0.01 (λ learned
    nothing yet); "moving" when the last quarter carries more than a tenth of the whole move (a
    steady trend carries a quarter); "drifting" when p barely moves there but λ's gradient still
    points one way (for some source its mean over the tail is more than DRIFT_Z standard errors
    from 0: a decayed lr_lam, not a stationary point, holds p still); else "settled". The
    sentence (`text`, printed as the run ends) starts with the verdict's word, as verdict.json.
    """
    names = list(rows[0]["p"])
    p = np.array([[r["p"][n] for n in names] for r in rows])
    k = min(len(rows), max(2, int(round(len(rows) * tail))))
    total = float(np.abs(p - p[0]).max())
    recent = float(np.abs(p[-1] - p[-k]).max())
    rate = recent / max(k - 1, 1) * 100
    grads, grad, drift = _lam_grads(rows[-k:], p[-k:], names)
    span = f"over the last {k} of {len(rows)} steps"
    knob = "doremi_eta" if "phase" in rows[0] else "lr_lam"  # DoReMi's weights step, or λ's
    if len(rows) < MIN_STEPS:
        state = "too short"
        text = f"too short: {len(rows)} steps are too few to judge; run at least {MIN_STEPS}"
    elif total < UNMOVED:
        state = "not moved"
        text = (
            f"not moved (not converged): p is at most {total:.2g} from its start after "
            f"{len(rows)} steps; raise {knob} or run longer"
        )
    elif recent > SETTLED_SHARE * total:
        state = "moving"
        text = (
            f"moving (not converged): p moves {rate:.2g} per 100 steps {span} "
            f"({recent / total:.0%} of its whole move); run longer or raise {knob}"
        )
    elif drift is not None and drift > DRIFT_Z:
        state = "drifting"
        lrs = [r["lr_lam"] for r in rows if "lr_lam" in r]
        fell = (
            f" (lr_lam fell to {lrs[-1] / max(lrs):.1%} of its peak)"
            if lrs and max(lrs) > 0 and lrs[-1] < 0.5 * max(lrs)
            else ""
        )
        text = (
            f"drifting (not converged): p moved only {recent:.2g} {span}{fell}, but λ's "
            f"gradient still points one way ({drift:.1f} standard errors from 0); run longer or "
            "raise lr_lam"
        )
    else:
        state = "settled"
        text = (
            f"settled (converged): p moved {recent:.2g} {span} ({recent / total:.0%} of its "
            "whole move)"
        )
    if grads:
        text += f"; λ-gradient norm {grad:.2g}"
        if drift is not None and state == "settled":
            text += f", no steady direction ({drift:.1f} standard errors at most)"
    return {
        "verdict": state,
        "text": text,
        "steps": len(rows),
        "tail_steps": k,
        "moved_tail": recent,
        "moved_total": total,
        "per_100_steps": rate,
        "lam_grad_norm": grad,
        "lam_grad_drift": drift,
    }


# ------------------------------------------------------------------ the run folder's guards
