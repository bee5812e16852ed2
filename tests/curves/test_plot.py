"""The learning-curve SVG: valid XML holding the points, the fit, the target and the prediction."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from shoal.curves.fit import fit_points, predict_examples
from shoal.curves.plot import _nice_ticks, render_svg

SVG = "{http://www.w3.org/2000/svg}"
NOISE = [0.004, -0.003, 0.002, -0.004, 0.001]
PTS = [(n, 0.6 - 0.07 * math.log2(n) + d) for n, d in zip([4, 8, 16, 32, 64], NOISE)]


def texts(root):
    return [t.text for t in root.iter(f"{SVG}text")]


def test_svg_parses_and_holds_points_fit_target_and_prediction():
    fit = fit_points(PTS)
    pred = predict_examples(fit, 0.05, PTS)
    root = ET.fromstring(render_svg(PTS, fit, pred, title="Tickets <v2> & \"co\"", metric="error rate"))
    assert root.tag == f"{SVG}svg"
    circles = [c for c in root.iter(f"{SVG}circle") if c.get("r") == "4.5"]
    assert len(circles) >= len(PTS)  # the points (+ the legend swatch)
    labels = texts(root)
    for _, e in PTS:
        assert f"{e:.3g}" in labels
    for n, _ in PTS:
        assert f"{n:,}" in labels  # an x tick at each measured size
    assert f"n = {pred.n_examples}" in labels  # and at the predicted n
    assert "Tickets <v2> & \"co\"" in labels and root.find(f"{SVG}title").text == "Tickets <v2> & \"co\""
    assert any(t.startswith("log2 fit: e = ") for t in labels)
    assert "target 0.05" in labels
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == 2 and lines[1].get("stroke-dasharray")  # solid fit, dashed extrapolation
    assert any(r.get("fill-opacity") == "0.12" for r in root.iter(f"{SVG}rect"))  # interval shaded


@pytest.mark.parametrize("target", [None, 0.08, 0.3])
def test_svg_without_fit_or_with_no_predicted_n(target):
    pts = [(n, 0.1 + 2.0 * n ** -0.5) for n in (64, 128, 256, 512)]
    if target is None:
        svg = render_svg(pts)
    else:  # 0.08 is below the asymptote 0.1: no n; 0.3 is already met
        fit = fit_points(pts)
        svg = render_svg(pts, fit, predict_examples(fit, target, pts))
    root = ET.fromstring(svg)
    assert len(list(root.iter(f"{SVG}circle"))) >= len(pts)
    assert all(f"{e:.3g}" in texts(root) for _, e in pts)


def test_svg_is_deterministic():
    fit = fit_points(PTS)
    pred = predict_examples(fit, 0.1, PTS)
    assert render_svg(PTS, fit, pred) == render_svg(PTS, fit, pred)


def test_svg_rejects_bad_points():
    with pytest.raises(ValueError, match=r"^points"):
        render_svg([(10, 0.2)])


def test_nice_ticks():
    assert _nice_ticks(0.47) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    assert _nice_ticks(0.21) == [0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    assert _nice_ticks(0.0)[-1] >= 1.0
