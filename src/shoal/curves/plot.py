"""Learning-curve pictures: a hand-written, self-contained SVG (no plotting library).

`render_svg` draws the measured points on a log2 x-axis, the fitted curve (dashed past the
largest measured size), the target error, and the predicted n with its interval shaded. It
imports nothing beyond the standard library and numpy, and does no fitting (`fit.py`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

import numpy as np

from .fit import CurveFit, Point, Prediction, check_points

W, H = 720, 510
X0, X1, Y0, Y1 = 70, 700, 76, 356  # plot area: left, right, top, bottom (SVG y grows downward)
INK, MUTED, ACCENT, TARGET = "#1f2937", "#6b7280", "#2563eb", "#dc2626"


def _fmt_n(n: float) -> str:
    n = int(round(n))
    if n < 10_000:
        return f"{n:,}"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _nice_ticks(top: float, count: int = 5) -> list[float]:
    """Ticks 0, step, ..., >= top, with step 1, 2, 2.5 or 5 times a power of ten."""
    top = top if top > 0 else 1.0
    raw = top / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [round(i * step, 10) for i in range(math.ceil(top / step - 1e-9) + 1)]


def _text(x: float, y: float, s: str, *, size: int = 11, anchor: str = "middle", fill: str = INK,
          weight: str = "normal") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
            f'font-weight="{weight}">{escape(s)}</text>')


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str, *, dash: str = "",
          width: float = 1) -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
            f'stroke-width="{width}"{d}/>')


def _polyline(xy: list[tuple[float, float]], stroke: str, *, dash: str = "") -> str:
    d = f' stroke-dasharray="{dash}"' if dash else ""
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    return f'<polyline points="{pts}" fill="none" stroke="{stroke}" stroke-width="2"{d}/>'


def render_svg(points: Sequence[Point], fit: CurveFit | None = None, prediction: Prediction | None = None,
               *, title: str = "", metric: str = "error") -> str:
    """The learning curve as a standalone SVG document (a str).

    Args:
        points: the measured (n, error) pairs, n strictly increasing.
        fit: the fitted curve to draw, if any.
        prediction: the target line, predicted n and interval to draw, if any.
        title: heading; metric: the y-axis quantity's name. Both are XML-escaped.
    """
    ns, es = check_points(points)
    n_pred = prediction.n_examples if prediction is not None else None
    # x: log2(n) from half a doubling below the smallest size to past the prediction
    t_lo = math.log2(ns[0]) - 0.5
    t_hi = math.log2(max(ns[-1], n_pred or 0)) + (0.5 if n_pred or fit is None else 1.0)
    t_fit = np.linspace(math.log2(ns[0]), t_hi, 160)
    e_fit = np.array([fit.predict(2.0 ** t) for t in t_fit]) if fit is not None else np.array([])
    in_range = e_fit[t_fit <= math.log2(ns[-1]) + 1e-9] if fit is not None else e_fit
    top = max([float(es.max())] + [float(v) for v in in_range]
              + ([prediction.target_error] if prediction is not None else []))
    yticks = _nice_ticks(top * 1.05)
    y_top = yticks[-1]

    def sx(n: float) -> float:
        return X0 + (math.log2(n) - t_lo) / (t_hi - t_lo) * (X1 - X0)

    def sy(e: float) -> float:
        return Y1 - e / y_top * (Y1 - Y0)

    clip = "clip-" + hashlib.sha1(repr((ns.tolist(), es.tolist(), title)).encode()).hexdigest()[:10]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="system-ui, -apple-system, Segoe UI, sans-serif">',
           f'<title>{escape(title or "Learning curve")}</title>',
           f'<defs><clipPath id="{clip}"><rect x="{X0}" y="{Y0}" width="{X1 - X0}" height="{Y1 - Y0}"/>'
           '</clipPath></defs>',
           f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
           _text(X0, 24, title or "Learning curve", size=15, anchor="start", weight="bold")]
    if prediction is not None:
        for i, line in enumerate(_wrap(prediction.message)):
            out.append(_text(X0, 44 + 14 * i, line, anchor="start", fill=MUTED))
    # axes and ticks
    for v in yticks:
        out += [_line(X0, sy(v), X1, sy(v), "#e5e7eb"), _text(X0 - 6, sy(v) + 4, f"{v:g}", anchor="end")]
    out += [_line(X0, Y1, X1, Y1, INK), _line(X0, Y0, X0, Y1, INK)]
    for n in ns:
        out += [_line(sx(n), Y1, sx(n), Y1 + 4, INK), _text(sx(n), Y1 + 17, _fmt_n(n))]
    out.append(_text((X0 + X1) / 2, Y1 + 50, "training examples n (log2 scale)", fill=MUTED))
    out.append(f'<text x="18" y="{(Y0 + Y1) / 2:.1f}" font-size="11" text-anchor="middle" fill="{MUTED}" '
               f'transform="rotate(-90 18 {(Y0 + Y1) / 2:.1f})">{escape(metric)}</text>')
    body = [f'<g clip-path="url(#{clip})">']
    # predicted n: interval shaded, then the marker
    if prediction is not None and n_pred is not None:
        lo = sx(max(prediction.low or n_pred, 2.0 ** t_lo))
        hi = X1 if prediction.high is None else min(sx(prediction.high), X1)
        body.append(f'<rect x="{lo:.1f}" y="{Y0}" width="{max(hi - lo, 1):.1f}" height="{Y1 - Y0}" '
                    f'fill="{ACCENT}" fill-opacity="0.12"/>')
        body.append(_line(sx(n_pred), Y0, sx(n_pred), Y1, ACCENT, width=1.5))
        out += [_line(sx(n_pred), Y1, sx(n_pred), Y1 + 4, ACCENT),
                _text(sx(n_pred), Y1 + 32, f"n = {_fmt_n(n_pred)}", fill=ACCENT, weight="bold")]
    if prediction is not None:
        yt = sy(prediction.target_error)
        body.append(_line(X0, yt, X1, yt, TARGET, dash="6 4", width=1.5))
        out.append(_text(X0 + 6, yt - 5, f"target {prediction.target_error:g}", anchor="start", fill=TARGET))
    # fitted curve: solid over the measured range, dashed beyond it
    if fit is not None:
        split = math.log2(ns[-1])
        xy = [(sx(2.0 ** t), sy(e)) for t, e in zip(t_fit, e_fit)]
        inside = [p for p, t in zip(xy, t_fit) if t <= split + 1e-9]
        beyond = [inside[-1]] + [p for p, t in zip(xy, t_fit) if t > split + 1e-9]
        body.append(_polyline(inside, ACCENT))
        if len(beyond) > 1:
            body.append(_polyline(beyond, ACCENT, dash="5 4"))
    body.append("</g>")
    out += body
    # measured points with their values
    for n, e in zip(ns, es):
        out.append(f'<circle cx="{sx(n):.1f}" cy="{sy(e):.1f}" r="4.5" fill="{INK}"/>')
        out.append(_text(sx(n), sy(e) - 9, f"{e:.3g}", size=10))
    out += _legend(fit, prediction, metric, len(ns))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend(fit: CurveFit | None, prediction: Prediction | None, metric: str, count: int) -> list[str]:
    def stroke(color: str, dash: str = ""):
        return lambda y: _line(X0 + 2, y - 4, X0 + 22, y - 4, color, dash=dash, width=2)

    def dot(y: float) -> str:
        return f'<circle cx="{X0 + 12}" cy="{y - 4:.1f}" r="4.5" fill="{INK}"/>'

    def band(y: float) -> str:
        return (f'<rect x="{X0 + 6}" y="{y - 10:.1f}" width="12" height="12" fill="{ACCENT}" '
                'fill-opacity="0.3"/>')

    rows = [(dot, f"measured {metric} ({count} sizes)")]
    if fit is not None:
        loo = fit.loo_error.get(fit.model)
        stats = f"R\u00b2 {fit.r2:.3f}" + (f", leave-one-out error {loo:.3g}" if loo is not None else "")
        rows.append((stroke(ACCENT), f"{fit.model} fit: {fit.formula()} ({stats})"))
        rows.append((stroke(ACCENT, "5 4"), "fit beyond the largest measured size (extrapolated)"))
    if prediction is not None:
        rows.append((stroke(TARGET, "6 4"), f"target {metric} {prediction.target_error:g}"))
        p = prediction
        if p.n_examples is not None:
            high = "unbounded" if p.high is None else f"{p.high:,}"
            row = [band, f"predicted n = {p.n_examples:,} (interval {p.low:,} to {high})"]
        else:
            row = [lambda y: "", "no predicted n"]
        flags = [f for f in ("extrapolation", "flat_or_rising", "already_met", "unreachable")
                 if getattr(p, f)]
        row[1] += f"; flags: {', '.join(flags)}" if flags else ""
        rows.append(tuple(row))
    out = []
    for i, (swatch, label) in enumerate(rows):
        y = Y1 + 78 + 16 * i
        out += [swatch(y), _text(X0 + 30, y, label, anchor="start")]
    return out


def _wrap(s: str, width: int = 115, lines: int = 2) -> list[str]:
    out: list[str] = []
    for word in s.split():
        if out and len(out[-1]) + 1 + len(word) <= width:
            out[-1] += " " + word
        else:
            out.append(word)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][:width - 3] + "..."
    return out
