// A small SVG line chart (no library): series of [x, y] points on linear axes, or a log2 x axis
// for learning curves. Colours come from the stylesheet through each series' class.

const NS = "http://www.w3.org/2000/svg";
const PAD = { left: 52, right: 16, top: 30, bottom: 40 };

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceStep(raw) {
  const p = 10 ** Math.floor(Math.log10(raw));
  const f = raw / p;
  return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

function ticks(lo, hi, n = 5) {
  const step = niceStep((hi - lo) / n || 1);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-6; v += step) out.push(+v.toPrecision(12));
  return out;
}

const label = (v) => (Math.abs(v) >= 1000 ? v.toLocaleString("en-US") : `${+v.toPrecision(4)}`);

/**
 * Args: series [{name, cls, points: [[x, y]], dots}], xLabel, yLabel, logX, width, height.
 * Returns an <svg> whose data-points attribute counts the points drawn.
 */
export function lineChart({ series, xLabel = "", yLabel = "", logX = false, width = 640, height = 260 }) {
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, class: "line-chart", role: "img" });
  const all = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  svg.dataset.points = String(all.length);
  if (!all.length) {
    svg.append(svgEl("text", { x: width / 2, y: height / 2, class: "empty", "text-anchor": "middle" },
      "No points yet"));
    return svg;
  }
  const tx = logX ? Math.log2 : (x) => x;
  let [x0, x1] = [Math.min(...all.map((p) => tx(p[0]))), Math.max(...all.map((p) => tx(p[0])))];
  let [y0, y1] = [Math.min(0, ...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) y1 = y0 + 1;
  y1 += (y1 - y0) * 0.05;
  const W = width - PAD.left - PAD.right;
  const H = height - PAD.top - PAD.bottom;
  const sx = (x) => PAD.left + ((tx(x) - x0) / (x1 - x0)) * W;
  const sy = (y) => PAD.top + H - ((y - y0) / (y1 - y0)) * H;

  const axes = svgEl("g", { class: "axes" });
  for (const v of ticks(y0, y1)) {
    axes.append(svgEl("line", { x1: PAD.left, x2: PAD.left + W, y1: sy(v), y2: sy(v), class: "grid" }));
    axes.append(svgEl("text", { x: PAD.left - 6, y: sy(v) + 4, "text-anchor": "end" }, label(v)));
  }
  const xs = logX ? [...new Set(all.map((p) => p[0]))].sort((a, b) => a - b) : ticks(x0, x1, 6);
  for (const v of xs) {
    axes.append(svgEl("line", { x1: sx(v), x2: sx(v), y1: PAD.top + H, y2: PAD.top + H + 4, class: "tick" }));
    axes.append(svgEl("text", { x: sx(v), y: PAD.top + H + 16, "text-anchor": "middle" }, label(v)));
  }
  axes.append(svgEl("line", { x1: PAD.left, x2: PAD.left + W, y1: PAD.top + H, y2: PAD.top + H, class: "axis" }));
  axes.append(svgEl("line", { x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: PAD.top + H, class: "axis" }));
  axes.append(svgEl("text", { x: PAD.left + W / 2, y: height - 6, "text-anchor": "middle", class: "axis-label" }, xLabel));
  axes.append(svgEl("text", { x: 12, y: PAD.top + H / 2, "text-anchor": "middle", class: "axis-label",
                              transform: `rotate(-90 12 ${PAD.top + H / 2})` }, yLabel));
  svg.append(axes);

  let lx = PAD.left + 8;
  for (const s of series) {
    const pts = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    const g = svgEl("g", { class: `series ${s.cls}` });
    if (pts.length > 1) {
      g.append(svgEl("polyline", { points: pts.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" "), fill: "none" }));
    }
    if (s.dots || pts.length === 1) {
      for (const [x, y] of pts) {
        const dot = svgEl("circle", { cx: sx(x), cy: sy(y), r: 3.5 });
        dot.append(svgEl("title", {}, `${s.name}: ${label(y)} at ${label(x)}`));
        g.append(dot);
      }
    }
    svg.append(g);
    if (pts.length) {
      const legend = svgEl("g", { class: `legend series ${s.cls}` });
      legend.append(svgEl("line", { x1: lx, x2: lx + 16, y1: 11, y2: 11 }));
      const t = svgEl("text", { x: lx + 20, y: 15 }, s.name);
      legend.append(t);
      svg.append(legend);
      lx += 28 + s.name.length * 7;
    }
  }
  return svg;
}
