"""Learning curves: fit held-out error e(n) against training-set size n, predict the n for a target.

Two models: `log2`, e = a + b*log2(n) (the same gain per doubling, least squares), and `power`,
e = c + k*n**-alpha (levels off at a floor 0 <= c <= min(e); alpha on a grid in [0.01, 2] with
closed-form c and k at each alpha, then refined). Leave-one-out error picks between them. Pure
numpy, deterministic. No training, no job bookkeeping, no plotting (`plot.py`) here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Point = tuple[int, float]
MODELS = ("log2", "power")
ALPHA_MIN, ALPHA_MAX = 0.01, 2.0
_ALPHA_GRID = np.linspace(ALPHA_MIN, ALPHA_MAX, 200)
POWER_MARGIN = 0.1      # power must beat log2's leave-one-out error by 10%: log2 is the simpler model
FLAT_SLOPE = -1e-3      # a fit falling less than 0.001 per doubling over the measured range is flat
EXTRAPOLATION_FACTOR = 4.0
MAX_LOG2_N = 64.0       # a target reached only beyond 2**64 examples counts as unreachable


def check_points(points: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
    """(n, error) pairs -> float arrays (ns, es); ValueError naming the bad field.

    Sizes must be positive integers, strictly increasing; errors finite and >= 0; at least 2.
    """
    if points is None or isinstance(points, (str, bytes)) or len(points) < 2:
        raise ValueError("points: need at least 2 (n, error) pairs")
    ns: list[float] = []
    es: list[float] = []
    for i, p in enumerate(points):
        try:
            n, e = p
        except (TypeError, ValueError):
            raise ValueError(f"points[{i}]: must be an (n, error) pair") from None
        if isinstance(n, bool) or not isinstance(n, (int, float, np.integer, np.floating)) \
                or not math.isfinite(n) or n != int(n) or n < 1:
            raise ValueError(f"points[{i}].n: must be a positive integer")
        if isinstance(e, bool) or not isinstance(e, (int, float, np.integer, np.floating)) \
                or not math.isfinite(e) or e < 0:
            raise ValueError(f"points[{i}].error: must be a finite number >= 0")
        if ns and n <= ns[-1]:
            raise ValueError(f"points[{i}].n: sizes must be strictly increasing")
        ns.append(float(n))
        es.append(float(e))
    return np.array(ns), np.array(es)


# --- the two models: fit(ns, es) -> params, predict(params, n) -> e, solve(params, e) -> n ---

def _fit_log2(ns: np.ndarray, es: np.ndarray) -> dict[str, float]:
    t = np.log2(ns)
    tc = t - t.mean()
    b = float((tc * (es - es.mean())).sum() / (tc * tc).sum())
    return {"a": float(es.mean() - b * t.mean()), "b": b}


def _power_at(alpha: float, x_base: np.ndarray, es: np.ndarray, c_max: float) -> tuple[float, float, float]:
    """Least squares c, k of e = c + k*x, x = x_base**-alpha, with c clamped to [0, c_max].

    The SSE minimised over k is a convex quadratic in c, so clamping the free optimum of c to
    the box and refitting k gives the constrained optimum. Returns (sse, c, k).
    """
    x = x_base ** -alpha
    xc = x - x.mean()
    sxx = float((xc * xc).sum())
    k = float((xc * (es - es.mean())).sum() / sxx) if sxx > 0 else 0.0
    c = float(es.mean() - k * x.mean())
    if not 0.0 <= c <= c_max:
        c = min(max(c, 0.0), c_max)
        k = float((x * (es - c)).sum() / (x * x).sum())
    r = es - c - k * x
    return float((r * r).sum()), c, k


def _fit_power(ns: np.ndarray, es: np.ndarray) -> dict[str, float]:
    """Power law with a floor; from 2 points the pure power law e = k*n**-alpha (c = 0)."""
    n_ref = float(np.exp(np.log(ns).mean()))  # x = (n / n_ref)**-alpha stays near 1: well scaled
    x_base = ns / n_ref
    c_max = float(es.min()) if len(ns) >= 3 else 0.0
    sse = [_power_at(a, x_base, es, c_max)[0] for a in _ALPHA_GRID]
    i = int(np.argmin(sse))
    lo, hi = _ALPHA_GRID[max(i - 1, 0)], _ALPHA_GRID[min(i + 1, len(_ALPHA_GRID) - 1)]
    g = (math.sqrt(5) - 1) / 2  # golden-section search on [lo, hi]
    p, q = hi - g * (hi - lo), lo + g * (hi - lo)
    fp, fq = _power_at(p, x_base, es, c_max)[0], _power_at(q, x_base, es, c_max)[0]
    for _ in range(40):
        if fp <= fq:
            hi, q, fq = q, p, fp
            p = hi - g * (hi - lo)
            fp = _power_at(p, x_base, es, c_max)[0]
        else:
            lo, p, fp = p, q, fq
            q = lo + g * (hi - lo)
            fq = _power_at(q, x_base, es, c_max)[0]
    best = min((sse[i], float(_ALPHA_GRID[i])), (fp, p), (fq, q))[1]
    _, c, k_ref = _power_at(best, x_base, es, c_max)
    return {"c": c, "k": k_ref * n_ref ** best, "alpha": float(best)}


def _predict(model: str, params: dict[str, float], n: float) -> float:
    n = float(n)
    if model == "log2":
        return params["a"] + params["b"] * math.log2(n)
    return params["c"] + params["k"] * n ** -params["alpha"]


def _solve(model: str, params: dict[str, float], target: float) -> float | None:
    """The n where the (falling) curve reaches `target`: None if it never does, inf beyond 2**64."""
    if model == "log2":
        a, b = params["a"], params["b"]
        if b >= 0:
            return None
        log2_n = (target - a) / b
    else:
        c, k, alpha = params["c"], params["k"], params["alpha"]
        if k <= 0 or target <= c:
            return None
        log2_n = -math.log2((target - c) / k) / alpha
    return math.inf if log2_n > MAX_LOG2_N else max(2.0 ** log2_n, 1.0)


_FIT = {"log2": _fit_log2, "power": _fit_power}


def _loo_error(model: str, ns: np.ndarray, es: np.ndarray) -> float:
    """Mean |error| predicting each point from a refit on the others."""
    idx = np.arange(len(ns))
    errs = []
    for i in idx:
        params = _FIT[model](ns[idx != i], es[idx != i])
        errs.append(abs(_predict(model, params, ns[i]) - es[i]))
    return float(np.mean(errs))


@dataclass(slots=True)
class CurveFit:
    """A fitted learning curve."""

    model: str
    """"log2" (e = a + b*log2 n) or "power" (e = c + k*n**-alpha)."""
    params: dict[str, float]
    """{"a", "b"} for log2; {"c", "k", "alpha"} for power."""
    loo_error: dict[str, float | None]
    """Leave-one-out mean absolute error of each model; None with fewer than 3 points."""
    r2: float
    """Coefficient of determination of the chosen model on all points (1.0 for an exact fit)."""
    n_points: int
    """How many (n, error) points were fitted."""
    note: str = ""
    """Why this model was chosen, in words."""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: must be one of {MODELS}, got {self.model!r}")

    def predict(self, n: float) -> float:
        """The fitted error at n examples."""
        return _predict(self.model, self.params, n)

    def solve(self, target: float) -> float | None:
        """The n at which the fit reaches `target` (None never, inf only beyond 2**64)."""
        return _solve(self.model, self.params, target)

    def asymptote(self) -> float:
        """The error the fit tends to as n grows: c for power, -inf/a/+inf for log2 by b's sign."""
        if self.model == "power":
            return self.params["c"]
        b = self.params["b"]
        return -math.inf if b < 0 else (math.inf if b > 0 else self.params["a"])

    def formula(self) -> str:
        """The fit as text, e.g. "e = 0.6 - 0.07*log2(n)"."""
        p = self.params
        if self.model == "log2":
            return f"e = {p['a']:.4g} {'-' if p['b'] < 0 else '+'} {abs(p['b']):.4g}*log2(n)"
        return f"e = {p['c']:.4g} {'-' if p['k'] < 0 else '+'} {abs(p['k']):.4g}*n^-{p['alpha']:.3g}"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "formula": self.formula()}


def fit_points(points: Sequence[Point]) -> CurveFit:
    """Fit both models and keep the one with the lower leave-one-out error.

    Args:
        points: (n_examples, held_out_error) pairs, n strictly increasing, at least 2.

    With fewer than 3 points there is nothing to leave out: log2 is used and the note says so.
    Power is chosen only when its leave-one-out error is at least 10% below log2's.
    """
    ns, es = check_points(points)
    if len(ns) < 3:
        model, loo = "log2", {"log2": None, "power": None}
        note = "only 2 points: log2 used (choosing a model needs at least 3)"
    else:
        loo = {m: _loo_error(m, ns, es) for m in MODELS}
        model = "power" if loo["power"] < (1 - POWER_MARGIN) * loo["log2"] else "log2"
        note = (f"{model} chosen by leave-one-out error "
                f"(log2 {loo['log2']:.4g}, power {loo['power']:.4g})")
    params = _FIT[model](ns, es)
    fitted = np.array([_predict(model, params, n) for n in ns])
    sse, sst = float(((es - fitted) ** 2).sum()), float(((es - es.mean()) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse <= 1e-24 else 0.0)
    return CurveFit(model=model, params=params, loo_error=loo, r2=r2, n_points=len(ns), note=note)


@dataclass(slots=True)
class Prediction:
    """How many examples the fit says a target error needs, with honest flags."""

    target_error: float
    """The error asked for, in (0, 1)."""
    model: str
    """The model the prediction came from."""
    n_examples: int | None
    """Examples needed; None when the fit gives no trustworthy answer (flat, unreachable)."""
    low: int | None
    """Low end of the interval (see `predict_examples`); None with no prediction."""
    high: int | None
    """High end; None with no prediction, or unbounded (a refit or band edge never reaches the target)."""
    slope_per_doubling: float
    """The fit's average change in error per doubling of n over the measured range."""
    extrapolation: bool
    """The predicted n is more than 4x the largest measured n."""
    flat_or_rising: bool
    """The fit falls less than 0.001 per doubling: more data of this kind will not help."""
    already_met: bool
    """The largest measured size already has error <= target."""
    unreachable: bool
    """The fit never reaches the target: its asymptote is at or above it (or past 2**64 examples)."""
    message: str
    """One or two sentences for people."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# two-sided 95% Student t quantiles by degrees of freedom; 2.0 beyond the table
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def _band_halfwidth(fit: CurveFit, ns: np.ndarray, es: np.ndarray, n: float) -> float:
    """Half-width in error of the 95% confidence band of the fitted curve at n.

    t * s * sqrt(1/m + (log2 n - mean log2 n)**2 / sum (log2 n_i - mean)**2), s the residual
    standard deviation with m - parameters degrees of freedom: the textbook band of a straight
    line, exact for log2 under its assumptions, a log2-linear approximation for power. 0 when
    no degree of freedom is left (an exact fit; the leave-one-out spread is all there is).
    """
    dof = len(ns) - (2 if fit.model == "log2" else 3)
    if dof < 1:
        return 0.0
    resid = es - np.array([fit.predict(x) for x in ns])
    s = math.sqrt(float((resid ** 2).sum()) / dof)
    t = np.log2(ns)
    lever = 1 / len(ns) + (math.log2(n) - t.mean()) ** 2 / float(((t - t.mean()) ** 2).sum())
    return _T95.get(dof, 2.0) * s * math.sqrt(lever)


def _check_target(target_error: float) -> float:
    if isinstance(target_error, bool) or not isinstance(target_error, (int, float, np.integer, np.floating)) \
            or not 0.0 < target_error < 1.0:  # NaN fails the comparison too
        raise ValueError("target_error: must be in (0, 1)")
    return float(target_error)


def _fmt_n(n: float | None) -> str:
    return "unbounded" if n is None else f"{int(n):,}"


def predict_examples(fit: CurveFit, target_error: float, points: Sequence[Point]) -> Prediction:
    """The number of examples at which `fit` reaches `target_error`.

    Args:
        fit: the curve from `fit_points(points)`.
        target_error: the held-out error wanted, in (0, 1) exclusive.
        points: the measured (n, error) pairs the fit came from.

    Interval: the union of two spreads, each holding the point estimate. (1) Leave-one-out:
    the same model refitted without each point in turn, solved for the target; it shows how
    much the answer leans on any one measurement, which matters most with 3-5 points, where a
    3-parameter power fit has no residual left. (2) Confidence band: where the fit crosses
    target +- h, h the half-width of the curve's 95% band at the point estimate
    (`_band_halfwidth`); h is proportional to the residual standard deviation, so noisier data
    always widen it, and it grows with the distance of the prediction from the measured sizes.
    Either one never reaching the target makes `high` None (unbounded). With 2 points both are
    empty and the interval is the point. On synthetic log2 data with Gaussian noise it held the
    true n about 95% of the time (3-5 points); for power data it is an approximation (60-95%).

    With already_met, n_examples is the smallest measured n from which every measured error is
    <= target (a measurement, so low = high = n). Flat, rising or unreachable fits give None.
    """
    target = _check_target(target_error)
    ns, es = check_points(points)
    n_max = int(ns[-1])
    slope = (fit.predict(ns[-1]) - fit.predict(ns[0])) / math.log2(ns[-1] / ns[0])
    flat = bool(slope >= FLAT_SLOPE)
    met = bool(es[-1] <= target)
    n_star = fit.solve(target)
    asym = fit.asymptote()
    unreachable = not met and (n_star is None or math.isinf(n_star) or asym >= target)
    trend = f"{fit.model} fit, error {'falls' if slope < 0 else 'changes by'} {abs(slope):.3g} per doubling"
    flat_msg = (f"the error does not fall with more data ({slope:+.3g} per doubling over the measured "
                "range): more data of this kind will not help; check the labels")

    def result(n=None, low=None, high=None, extrapolation=False, message=""):
        return Prediction(target_error=target, model=fit.model, n_examples=n, low=low, high=high,
                          slope_per_doubling=float(slope), extrapolation=extrapolation,
                          flat_or_rising=flat, already_met=met, unreachable=unreachable, message=message)

    if met:
        first = len(es) - 1
        while first > 0 and es[first - 1] <= target:
            first -= 1
        n = int(ns[first])
        msg = (f"already met: measured error {es[-1]:.3g} at n={n_max:,} is <= target {target:g} "
               f"(first met from n={n:,})")
        return result(n, n, n, message=msg + ("; " + flat_msg if flat else ""))
    if flat:
        return result(message=flat_msg)
    if unreachable:
        if n_star is None and math.isfinite(asym):
            msg = (f"unreachable: the {fit.model} fit levels off at error {asym:.3g}, at or above the "
                   f"target {target:g}; more data of this kind is not predicted to get there")
        else:
            msg = f"unreachable: the {fit.model} fit reaches {target:g} only beyond 2^64 examples"
        return result(message=msg)

    cands, unbounded = [n_star], False
    if len(ns) >= 3:  # (1) leave-one-out refits of the same model
        idx = np.arange(len(ns))
        for i in idx:
            m = _solve(fit.model, _FIT[fit.model](ns[idx != i], es[idx != i]), target)
            unbounded |= m is None or math.isinf(m)
            cands += [] if m is None or math.isinf(m) else [m]
    h = _band_halfwidth(fit, ns, es, n_star)  # (2) confidence band of the fitted curve
    if h > 0:
        for t in (target + h, target - h):
            m = fit.solve(t) if t > 0 else None
            unbounded |= m is None or math.isinf(m)
            cands += [] if m is None or math.isinf(m) else [m]
    tol = 1e-9 * n_star  # 40000.0000001 is 40,000 examples, not 40,001
    n = max(math.ceil(n_star - tol), 1)
    low = min(max(math.floor(min(cands) + tol), 1), n)
    high = None if unbounded else max(math.ceil(max(cands) - tol), n)
    extrapolation = n > EXTRAPOLATION_FACTOR * n_max
    msg = (f"about {n:,} examples (interval {_fmt_n(low)} to {_fmt_n(high)}) to reach error "
           f"{target:g}; {trend}")
    if extrapolation:
        msg += (f". That is {n / n_max:.1f}x the largest measured size ({n_max:,}): an extrapolation, "
                "measure a larger subset before trusting it")
    elif n <= n_max:
        msg += (f". The fit crosses the target inside the measured range, but the largest size "
                f"measured {es[-1]:.3g}: noise; measure again")
    return result(n, low, high, extrapolation, msg)
