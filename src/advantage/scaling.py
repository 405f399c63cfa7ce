"""The ScaleRL ceiling fit: predict where a run's reward will level off from its early part.

    R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B)

C is compute on any axis (steps, tokens, seconds), R0 the starting reward, A the asymptotic reward, B > 0
the compute efficiency and C_mid the compute at half the gain. R0 is held fixed (the mean of the first
three rewards by compute, unless given) and A, B, log(C_mid) are fit by bounded least squares
(`scipy.optimize.least_squares`, from a few starting C_mid). The sigmoid is written in log C, so C_mid is
fit as log(C_mid) and steps in it are scale-free. The interval on A comes from resampling the residuals
around the fit and refitting (with R0 redrawn too when it was estimated, since A leans on it).

A ceiling only means something for a curve that rises. A run that peaks and then collapses would get an A
below its start, even below the reward's floor, so `fit_scaling_curve` first judges the curve (see
`not_rising`) and `ScalingFit.summary` then says that the reward is not rising instead of naming a ceiling.
`a_min` and `a_max`, the reward's range when it is known, bound A in every case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from advantage.tracking import RunLog

Array = NDArray[np.float64]
R0_POINTS = 3  # how many of the earliest rewards are averaged into R0 when it is not given
B_MAX = 10.0
AXES = {"step": "step", "seconds": "seconds", "tokens": "sequence_tokens"}  # axis -> metrics.jsonl field


@dataclass(frozen=True)
class ScalingFit:
    a: float  # asymptotic reward
    b: float  # compute efficiency (> 0)
    c_mid: float  # compute at half the gain from r0 to a
    r0: float  # starting reward (held fixed in the fit)
    a_interval: tuple[float, float]  # 90% bootstrap interval on a; (nan, nan) with no bootstrap
    n_points: int  # points used in the fit (after skip_frac)
    rmse: float  # root-mean-square residual on those points
    c_max: float = float("nan")  # the largest compute fitted: the run's compute so far
    rising: bool = True  # False: the reward is not rising, so a, b and c_mid predict nothing
    reason: str = ""  # why the reward is not rising; "" when it is
    peak: tuple[float, float] = (math.nan, math.nan)  # (compute, reward) of the best point
    last: tuple[float, float] = (math.nan, math.nan)  # (compute, reward) of the last point
    axis: str = "compute"  # what compute is counted in, for summary()

    def predict(self, c: float | Sequence[float] | Array) -> float | Array:
        """The fitted curve at compute `c` (a float for a scalar, an array otherwise)."""
        with np.errstate(divide="ignore"):  # C = 0 gives log C = -inf and so R0, the curve's limit
            log_c = np.log(np.asarray(c, dtype=np.float64))
        out = self.r0 + (self.a - self.r0) * _sigmoid(log_c, self.b, math.log(self.c_mid))
        return float(out) if out.ndim == 0 else out

    def summary(self, compute_so_far: float) -> str:
        """One line: the parameters and the predicted reward at 2x and 10x `compute_so_far`, or, for a
        reward that is not rising, why there is no ceiling to predict."""
        if not self.rising:
            (c_peak, y_peak), (_, y_last) = self.peak, self.last
            return (
                f"The reward is not rising (peaked at {self.axis} {c_peak:.4g} with {y_peak:.3f}, last "
                f"{y_last:.3f}; {self.reason}): no ceiling to predict"
            )
        lo, hi = self.a_interval
        at2, at10 = self.predict(2 * compute_so_far), self.predict(10 * compute_so_far)
        return (
            f"A={self.a:.4f} (90% CI {lo:.4f}..{hi:.4f}), B={self.b:.3f}, C_mid={self.c_mid:.4g}, "
            f"R0={self.r0:.4f}, rmse={self.rmse:.4f} on {self.n_points} points; predicted reward "
            f"{at2:.4f} at 2x ({2 * compute_so_far:.4g}) and {at10:.4f} at 10x ({10 * compute_so_far:.4g})"
        )


def _sigmoid(log_c: Array, b: Array | float, log_c_mid: Array | float) -> Array:
    """1 / (1 + (C_mid / C)^B), a logistic in log C; exp overflowing to inf gives the right limit, 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(np.multiply(b, np.subtract(log_c_mid, log_c))))


def _residual(log_c: Array, y: Array, r0: float, p: Array) -> Array:
    return y - (r0 + (p[0] - r0) * _sigmoid(log_c, p[1], p[2]))


def _residual_jac(log_c: Array, y: Array, r0: float, p: Array) -> Array:
    """(n, 3) d residual / d (A, B, log C_mid): minus the curve's derivatives."""
    s = _sigmoid(log_c, p[1], p[2])
    ds = -s * (1.0 - s) * (p[0] - r0)  # (n,) d f / d z, where z = B (log C_mid - log C)
    return -np.stack([s, ds * (p[2] - log_c), ds * p[1]], axis=1)


def _refine(log_c: Array, y: Array, r0: float, p0: Array, lo: Array, hi: Array) -> Array:
    """Minimise |y - f(p)|^2 over p = (A, B, log C_mid) within [lo, hi], starting from `p0`."""
    from scipy.optimize import least_squares  # imported here: it adds ~0.6 s and only a fit needs it

    fit = least_squares(
        lambda p: _residual(log_c, y, r0, p),
        np.clip(p0, lo, hi),
        jac=lambda p: _residual_jac(log_c, y, r0, p),
        bounds=(lo, hi),
        method="trf",
        x_scale="jac",
        ftol=1e-12,
        xtol=1e-12,
        gtol=1e-12,
    )
    return np.asarray(fit.x, dtype=np.float64)


def _fit(log_c: Array, y: Array, r0: float, lo: Array, hi: Array) -> Array:
    """The best of a few bounded least-squares fits, started with C_mid inside the data, near its end and
    beyond it (a run that has not yet bent), so one basin of the non-convex cost does not decide."""
    a0 = float(np.clip(y.max() if y[-1] >= r0 else y.min(), lo[0], hi[0]))
    starts = [np.quantile(log_c, 0.5), log_c.max(), log_c.max() + math.log(10.0)]
    fits = [_refine(log_c, y, r0, np.array([a0, 1.0, l0]), lo, hi) for l0 in starts]
    return min(fits, key=lambda p: float(np.sum(_residual(log_c, y, r0, p) ** 2)))


def kendall_tau(y: Array) -> float:
    """Kendall's tau-a of `y` against its order: +1 for a strictly rising series, -1 for a falling one."""
    n = y.size
    if n < 2:
        return 0.0
    s = sum(float(np.sign(y[i + 1 :] - y[i]).sum()) for i in range(n - 1))  # O(n) memory, not O(n^2)
    return s / (n * (n - 1) / 2)


def not_rising(y: Array, r0: float) -> str:
    """Why the rewards `y`, in compute order and starting at `r0`, are not rising; "" when they are.

    Levels are means over k = max(2, n // 4) consecutive points, so one noisy point decides nothing. The
    curve is not rising when its last level has given back more than half the rise from `r0` to its best
    level (a collapse, or a curve that never rose), or when reward and compute have no positive rank
    correlation (Kendall's tau <= 0).
    """
    k = max(2, y.size // 4)
    levels = np.convolve(y, np.full(k, 1.0 / k), mode="valid")  # (n - k + 1,) moving means
    best, late = float(levels.max()), float(levels[-1])
    if late <= r0:
        return f"the last {k} points average {late:.3f}, not above the start {r0:.3f}"
    if late <= (r0 + best) / 2:
        return f"the last {k} points average {late:.3f}, back below halfway from {r0:.3f} to {best:.3f}"
    tau = kendall_tau(y)
    if tau <= 0:
        return f"no upward trend: Kendall's tau of reward against compute is {tau:+.2f}"
    return ""


def fit_scaling_curve(
    compute: Sequence[float] | Array,
    reward: Sequence[float] | Array,
    *,
    r0: float | None = None,
    skip_frac: float = 0.0,
    n_bootstrap: int = 200,
    seed: int = 0,
    a_min: float | None = None,
    a_max: float | None = None,
) -> ScalingFit:
    """Fit the ScaleRL curve to (compute, reward) points; see the module docstring.

    `a_min` and `a_max` are the least and the most reward the task can give ([0, 1] for a success rate):
    the ceiling A is then fitted within them. Without them, a few noisy points can put A above anything
    reachable, or a falling curve put it below the floor.

    A curve that is not rising (see `not_rising`, judged on all points, and a fitted A not above R0) is
    still fitted, but the result has `rising=False` and a `reason`, and its summary names no ceiling.

    Points are sorted by compute. R0 defaults to the mean of the first three rewards of the whole series
    (before `skip_frac`), the run's starting level. `skip_frac` then drops that fraction of the earliest
    points from the fit. The 90% interval on A is the 5th..95th percentile of `n_bootstrap` refits to the
    fitted curve plus resampled residuals (`seed` fixes the resampling).
    """
    c = np.asarray(compute, dtype=np.float64).ravel()
    y = np.asarray(reward, dtype=np.float64).ravel()
    if c.shape != y.shape:
        raise ValueError(f"compute and reward differ in length ({c.size} vs {y.size})")
    if not np.all(np.isfinite(y)):
        raise ValueError("reward contains NaN or inf")
    if not np.all(np.isfinite(c)) or np.any(c <= 0):
        raise ValueError("compute must be finite and > 0 (C = 0 is the curve's R0 limit, not a point)")
    if not 0.0 <= skip_frac < 1.0:
        raise ValueError(f"skip_frac must be in [0, 1), got {skip_frac}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    order = np.argsort(c, kind="stable")
    c, y = c[order], y[order]
    r0_value = float(y[:R0_POINTS].mean()) if r0 is None else float(r0)
    if not math.isfinite(r0_value):
        raise ValueError("r0 must be finite")
    if a_max is not None and not (math.isfinite(a_max) and a_max >= y.max()):
        raise ValueError(f"a_max={a_max} is below the best observed reward {y.max():.4g}; raise it.")
    if a_min is not None and not (math.isfinite(a_min) and a_min <= y.min()):
        raise ValueError(f"a_min={a_min} is above the worst observed reward {y.min():.4g}; lower it.")
    skip = int(skip_frac * c.size)
    if c.size - skip < 4:
        raise ValueError(f"need at least 4 points to fit 3 parameters, got {c.size - skip} (after skip_frac)")
    reason = not_rising(y, r0_value)  # judged on the whole curve: skip_frac only narrows the fit
    i_peak = int(np.argmax(y))
    peak, last = (float(c[i_peak]), float(y[i_peak])), (float(c[-1]), float(y[-1]))
    c, y = c[skip:], y[skip:]

    log_c = np.log(c)
    span = log_c.max() - log_c.min()
    lo = np.array([min(y.min(), r0_value) - 1.0, 1e-3, log_c.min() - max(span, 1.0) - math.log(10.0)])
    hi = np.array([max(y.max(), r0_value) + 1.0, B_MAX, log_c.max() + max(span, 1.0) + math.log(1e3)])
    lo[0] = lo[0] if a_min is None else a_min
    hi[0] = hi[0] if a_max is None else a_max
    p = _fit(log_c, y, r0_value, lo, hi)
    if not reason and p[0] <= r0_value:
        reason = f"the fitted ceiling A={p[0]:.3f} is not above the start R0={r0_value:.3f}"
    res = _residual(log_c, y, r0_value, p)
    fitted = y - res

    interval = (math.nan, math.nan)
    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        a_boot = np.empty(n_bootstrap)
        for k in range(n_bootstrap):
            y_k = fitted + rng.choice(res, size=res.size, replace=True)
            # A estimated R0 is noisy too and A leans on it, so it is redrawn from the same residuals.
            r0_k = r0_value + (0.0 if r0 is not None else float(rng.choice(res, size=R0_POINTS).mean()))
            # Refit from the point estimate: the resampled curve is near it, so one start is enough.
            a_boot[k] = _refine(log_c, y_k, r0_k, p, lo, hi)[0]
        interval = (float(np.percentile(a_boot, 5)), float(np.percentile(a_boot, 95)))
    return ScalingFit(
        a=float(p[0]),
        b=float(p[1]),
        c_mid=float(math.exp(p[2])),
        r0=r0_value,
        a_interval=interval,
        n_points=int(c.size),
        c_max=float(np.max(c)),
        rmse=float(np.sqrt(np.mean(res * res))),
        rising=not reason,
        reason=reason,
        peak=peak,
        last=last,
    )


def fit_run(
    run_dir: Path,
    metric: str = "train/reward",
    axis: str = "step",
    *,
    r0: float | None = None,
    skip_frac: float = 0.0,
    n_bootstrap: int = 200,
    seed: int = 0,
    a_min: float | None = None,
    a_max: float | None = None,
) -> ScalingFit:
    """Fit `metric` from the train rows of `<run_dir>/metrics.jsonl` against `axis`.

    axis "step" uses each row's step; "seconds" and "tokens" are cumulative sums of the rows' "seconds"
    and "sequence_tokens" in file order, counting rows that lack `metric` (a skipped step still spent
    compute). The keyword arguments are those of `fit_scaling_curve`.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {sorted(AXES)}, got {axis!r}")
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"no metrics log at {path}")
    compute: list[float] = []
    reward: list[float] = []
    total = 0.0
    for row in RunLog(Path(run_dir)).rows():
        if row.get("split") != "train":
            continue
        if axis == "step":
            total = float(row["step"])
        else:
            total += float(row.get(AXES[axis], 0.0))
        if metric in row:
            compute.append(total)
            reward.append(float(row[metric]))
    if not reward:
        raise ValueError(f"no train rows with {metric!r} in {path}")
    fit = fit_scaling_curve(
        compute,
        reward,
        r0=r0,
        skip_frac=skip_frac,
        n_bootstrap=n_bootstrap,
        seed=seed,
        a_min=a_min,
        a_max=a_max,
    )
    return replace(fit, axis=axis)
