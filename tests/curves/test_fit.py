"""Curve fitting, model choice and predictions on synthetic learning curves.

Tolerance stated once: a fit on the first three points of a clean doubling series predicts the
fourth within 0.02 absolute error.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shoal.curves.fit import ALPHA_MAX, ALPHA_MIN, CurveFit, _fit_power, fit_points, predict_examples

NEXT_POINT_TOL = 0.02


def log2_curve(ns, noise=0.0, seed=0, a=0.6, b=-0.07):
    rng = np.random.default_rng(seed)
    return [(n, a + b * math.log2(n) + float(rng.normal(0, noise)) * bool(noise)) for n in ns]


def power_curve(ns, noise=0.0, seed=0, c=0.1, k=2.0, alpha=0.5):
    rng = np.random.default_rng(seed)
    return [(n, c + k * n ** -alpha + float(rng.normal(0, noise)) * bool(noise)) for n in ns]


LOG2_NS = [2, 4, 8, 16, 32, 64]            # 0.6 - 0.07*log2(n) stays positive up to n = 380
POWER_NS = [64 * 2 ** i for i in range(7)]  # 64 .. 4096


@pytest.mark.parametrize("seed", range(10))
def test_log2_data_chooses_log2(seed):
    fit = fit_points(log2_curve(LOG2_NS, noise=0.005, seed=seed))
    assert fit.model == "log2", fit.note
    assert fit.params["a"] == pytest.approx(0.6, abs=0.03)
    assert fit.params["b"] == pytest.approx(-0.07, abs=0.006)
    assert fit.loo_error["log2"] < fit.loo_error["power"]
    assert fit.r2 > 0.99


@pytest.mark.parametrize("seed", range(10))
def test_power_data_with_asymptote_chooses_power(seed):
    fit = fit_points(power_curve(POWER_NS, noise=0.002, seed=seed))
    assert fit.model == "power", fit.note
    assert fit.params["c"] == pytest.approx(0.1, abs=0.03)
    assert fit.loo_error["power"] < fit.loo_error["log2"]


def test_clean_power_law_recovers_its_parameters():
    fit = fit_points(power_curve(POWER_NS, c=0.05, k=3.0, alpha=0.7))
    assert fit.model == "power"
    assert fit.params["c"] == pytest.approx(0.05, abs=1e-6)
    assert fit.params["k"] == pytest.approx(3.0, rel=1e-4)
    assert fit.params["alpha"] == pytest.approx(0.7, abs=1e-5)
    assert fit.r2 == pytest.approx(1.0)


def test_power_fit_keeps_its_constraints():
    rng = np.random.default_rng(7)
    for _ in range(20):
        es = np.sort(rng.uniform(0.05, 0.6, 5))[::-1]
        ns = np.array([100.0 * 2 ** i for i in range(len(es))])
        p = _fit_power(ns, es)
        assert 0.0 <= p["c"] <= es.min() + 1e-12
        assert ALPHA_MIN - 1e-9 <= p["alpha"] <= ALPHA_MAX + 1e-9


def test_loo_error_matches_a_reference_loop():
    """Semantics: mean over i of |e_i - line fitted without i, evaluated at log2 n_i|."""
    pts = log2_curve(LOG2_NS, noise=0.01, seed=3)
    t = np.log2([n for n, _ in pts])
    e = np.array([v for _, v in pts])
    errs = []
    for i in range(len(pts)):
        keep = np.arange(len(pts)) != i
        b, a = np.polyfit(t[keep], e[keep], 1)
        errs.append(abs(a + b * t[i] - e[i]))
    assert fit_points(pts).loo_error["log2"] == pytest.approx(float(np.mean(errs)), rel=1e-9)


@pytest.mark.parametrize("series", [
    log2_curve([4, 8, 16, 32]),
    power_curve([1000, 2000, 4000, 8000], c=0.05, k=3.0, alpha=0.5),
    power_curve([500, 1000, 2000, 4000], c=0.02, k=1.5, alpha=0.35),
    power_curve([128, 256, 512, 1024], c=0.0, k=1.0, alpha=0.3),
], ids=["log2", "power-0.5", "power-0.35", "pure-power"])
def test_first_three_points_predict_the_fourth(series):
    fit = fit_points(series[:3])
    n4, e4 = series[3]
    assert abs(fit.predict(n4) - e4) < NEXT_POINT_TOL


def test_two_points_use_log2_and_say_so():
    fit = fit_points([(100, 0.4), (200, 0.33)])
    assert fit.model == "log2"
    assert fit.loo_error == {"log2": None, "power": None}
    assert "2 points" in fit.note
    assert fit.params["b"] == pytest.approx(-0.07)
    pred = predict_examples(fit, 0.19, [(100, 0.4), (200, 0.33)])
    assert pred.n_examples == 800 and pred.low == pred.high == 800


def test_prediction_hits_the_target_and_the_interval_holds_the_truth():
    pts = log2_curve([4, 8, 16, 32, 64], noise=0.005, seed=1)
    fit = fit_points(pts)
    pred = predict_examples(fit, 0.1, pts)
    true_n = 2 ** ((0.6 - 0.1) / 0.07)  # about 141
    assert pred.low <= pred.n_examples <= pred.high
    assert pred.low <= true_n <= pred.high
    assert fit.predict(pred.n_examples) <= 0.1 < fit.predict(pred.n_examples - 1)
    assert not (pred.extrapolation or pred.flat_or_rising or pred.already_met or pred.unreachable)
    assert "about" in pred.message


def test_interval_widens_with_noisier_data():
    ns = [4, 8, 16, 32, 64]
    pattern = [0.004, -0.003, 0.002, -0.004, 0.001]
    widths = []
    for scale in (1, 2, 3, 6):  # at 6 the noise hides the line: power is chosen, high unbounded
        pts = [(n, 0.6 - 0.07 * math.log2(n) + scale * d) for n, d in zip(ns, pattern)]
        pred = predict_examples(fit_points(pts), 0.1, pts)
        high = math.inf if pred.high is None else pred.high
        assert pred.low <= pred.n_examples <= high
        widths.append(math.log2(high / pred.low))
    assert widths[0] < widths[1] < widths[2] < widths[3] == math.inf


def test_clean_series_interval_is_tight():
    pts = power_curve(POWER_NS)
    pred = predict_examples(fit_points(pts), 0.11, pts)
    assert pred.n_examples == 40_000  # 0.1 + 2/sqrt(n) = 0.11 exactly at n = 40,000
    assert pred.low == pred.high == 40_000


def test_extrapolation_flag_beyond_four_times_the_largest_size():
    pts = log2_curve([2, 4, 8, 16, 32])
    far = predict_examples(fit_points(pts), 0.05, pts)   # n = 2**(0.55/0.07), about 232
    assert far.n_examples == 232 and far.extrapolation  # > 4 * 32
    assert "extrapolation" in far.message
    near = predict_examples(fit_points(pts), 0.15, pts)  # 2**6.43, about 86.1
    assert near.n_examples == 87 and not near.extrapolation  # rounded up


@pytest.mark.parametrize("pts", [
    [(1000, 0.30), (2000, 0.305), (4000, 0.298), (8000, 0.31)],   # flat with noise
    [(1000, 0.20), (2000, 0.22), (4000, 0.25), (8000, 0.27)],     # rising
    [(1000, 0.30), (2000, 0.2996), (4000, 0.2992), (8000, 0.2988)],  # -0.0004 per doubling
], ids=["flat", "rising", "barely-falling"])
def test_flat_or_rising_is_flagged_with_no_misleading_n(pts):
    pred = predict_examples(fit_points(pts), 0.1, pts)
    assert pred.flat_or_rising
    assert pred.n_examples is None and pred.low is None and pred.high is None
    assert "check the labels" in pred.message


def test_already_met():
    pts = log2_curve([4, 8, 16, 32, 64])  # errors 0.46 .. 0.18
    pred = predict_examples(fit_points(pts), 0.3, pts)
    assert pred.already_met and not pred.unreachable and not pred.extrapolation
    assert pred.n_examples == 32 and pred.low == pred.high == 32  # first size from which all meet it
    assert pred.message.startswith("already met")


def test_unreachable_asymptote():
    pts = power_curve(POWER_NS)  # levels off at 0.1
    fit = fit_points(pts)
    pred = predict_examples(fit, 0.08, pts)
    assert fit.asymptote() == pytest.approx(0.1, abs=1e-6)
    assert pred.unreachable and pred.n_examples is None and pred.low is None
    assert not pred.flat_or_rising
    assert "levels off" in pred.message


def test_deterministic_and_json_ready():
    pts = power_curve(POWER_NS, noise=0.003, seed=5)
    a, b = fit_points(pts), fit_points(list(pts))
    assert a.to_dict() == b.to_dict()
    pa, pb = predict_examples(a, 0.13, pts), predict_examples(b, 0.13, pts)
    assert pa.to_dict() == pb.to_dict()
    text = json.dumps({"fit": a.to_dict(), "prediction": pa.to_dict()}, allow_nan=False)
    assert json.loads(text)["fit"]["model"] == a.model
    assert all(type(pa.to_dict()[f]) is bool
               for f in ("extrapolation", "flat_or_rising", "already_met", "unreachable"))


@pytest.mark.parametrize("target", [0, 1, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_bad_target_error(target):
    pts = log2_curve([4, 8, 16])
    with pytest.raises(ValueError, match=r"^target_error: must be in \(0, 1\)$"):
        predict_examples(fit_points(pts), target, pts)


@pytest.mark.parametrize("pts, field", [
    ([], "points"),
    ([(100, 0.3)], "points"),
    (None, "points"),
    ([(100, 0.3), (100, 0.2)], r"points\[1\]\.n"),
    ([(200, 0.3), (100, 0.2)], r"points\[1\]\.n"),
    ([(0, 0.3), (100, 0.2)], r"points\[0\]\.n"),
    ([(1.5, 0.3), (100, 0.2)], r"points\[0\]\.n"),
    ([(True, 0.3), (100, 0.2)], r"points\[0\]\.n"),
    ([(100, -0.1), (200, 0.2)], r"points\[0\]\.error"),
    ([(100, 0.3), (200, float("nan"))], r"points\[1\]\.error"),
    ([(100, 0.3), (200, "0.2")], r"points\[1\]\.error"),
    ([(100, 0.3), (200,)], r"points\[1\]"),
])
def test_bad_points(pts, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        fit_points(pts)
    if pts and len(pts) >= 2:
        with pytest.raises(ValueError, match=f"^{field}"):
            predict_examples(fit_points([(1, 0.5), (2, 0.4)]), 0.1, pts)


def test_curve_fit_checks_its_model():
    with pytest.raises(ValueError, match="^model"):
        CurveFit(model="cubic", params={}, loo_error={}, r2=0.0, n_points=0)
