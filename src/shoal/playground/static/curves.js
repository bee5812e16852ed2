// The Learning curves tab: start a curve (nested doubling subsets of one training file), watch its
// points fill in (polled every second), read the fitted prediction, and see the server's plot.

import { api, get, post } from "./api.js";
import { lineChart } from "./chart.js";
import { $, el, fmtNum, numberOrAuto, showError, sleep } from "./ui.js";

const POLL_MS = 1000;
let follow = 0;
let plotUrl = null;

async function start(ev) {
  ev.preventDefault();
  const sizes = $("lc-sizes").value.split(/[\s,]+/).filter(Boolean).map(Number);
  const hp = { n_epochs: numberOrAuto($("lc-epochs")), learning_rate_multiplier: numberOrAuto($("lc-lr")) };
  const body = {
    model: $("lc-model").value, training_file: $("lc-training-file").value.trim(),
    sizes: sizes.length ? sizes : undefined, target_error: numberOrAuto($("lc-target")),
    metric: $("lc-metric").value,
    hyperparameters: Object.fromEntries(Object.entries(hp).filter(([, v]) => v !== undefined)),
  };
  try {
    const curve = await post("/v1/fine_tuning/learning_curves", body);
    showError($("lc-error"), null);
    refreshCurves();
    openCurve(curve.id);
  } catch (e) {
    showError($("lc-error"), e);
  }
}

export async function refreshCurves() {
  try {
    const curves = (await get("/v1/fine_tuning/learning_curves?limit=50")).data;
    $("lc-list").tBodies[0].replaceChildren(...curves.map((c) =>
      el("tr", { class: "clickable", dataset: { id: c.id }, onclick: () => openCurve(c.id) },
        el("td", { class: "mono", text: c.id }), el("td", {}, el("span", { class: `badge ${c.status}`, text: c.status })))));
  } catch (e) {
    showError($("lc-error"), e);
  }
}

function prediction(c) {
  if (c.error) return `Failed: ${c.error.message}`;
  const p = c.prediction;
  if (p?.message) return p.message;
  if (c.fit?.formula) return `Fit: ${c.fit.formula}${c.target_error ? "" : " (give a target error for a prediction)"}`;
  const done = c.points.filter((x) => x.status === "succeeded").length;
  return `${done} of ${c.sizes?.length ?? c.points.length} points trained…`;
}

async function showPlot(c) {
  try {
    const svg = await api("GET", `/v1/fine_tuning/learning_curves/${c.id}/plot`, undefined, { text: true });
    if (plotUrl) URL.revokeObjectURL(plotUrl);
    plotUrl = URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" }));
    $("lc-plot").replaceChildren(el("img", { src: plotUrl, alt: "learning curve plot", "data-testid": "lc-plot-img" }));
  } catch (e) {
    $("lc-plot").replaceChildren(el("p", { class: "hint", text: `No plot: ${e.message}` }));
  }
}

function render(c) {
  $("lc-view").hidden = false;
  $("lc-id").textContent = c.id;
  $("lc-status").textContent = c.status;
  $("lc-status").className = `badge ${c.status}`;
  $("lc-prediction").textContent = prediction(c);
  const pts = c.points.filter((p) => p.error !== null && p.error !== undefined).map((p) => [p.n_examples, p.error]);
  const what = c.metric === "valid_loss" ? "validation loss" : `error (${c.metric || "exact_match"})`;
  const svg = lineChart({ series: [{ name: what, cls: "s-curve", points: pts, dots: true }],
                          xLabel: "training examples (log scale)", yLabel: what, logX: true });
  svg.setAttribute("data-testid", "lc-chart");
  $("lc-chart-box").replaceChildren(svg);
  const rows = c.points.length ? c.points : (c.sizes || []).map((n, i) => (
    { n_examples: n, job_id: c.jobs?.[i] ?? "", status: "queued", error: null, valid_loss: null }));
  $("lc-points").tBodies[0].replaceChildren(...rows.map((p) =>
    el("tr", {}, el("td", { class: "num", text: String(p.n_examples) }), el("td", { class: "mono", text: p.job_id }),
      el("td", {}, el("span", { class: `badge ${p.status}`, text: p.status })),
      el("td", { class: "num", text: fmtNum(p.error) }), el("td", { class: "num", text: fmtNum(p.valid_loss) }))));
}

/** Show curve `id` and poll it every second until it ends; then fetch the server's plot. */
export async function openCurve(id) {
  const mine = ++follow;
  $("lc-plot").replaceChildren();
  for (;;) {
    try {
      const c = await get(`/v1/fine_tuning/learning_curves/${id}`);
      if (mine !== follow) return;
      render(c);
      if (c.status !== "running") {
        refreshCurves();
        if (c.status === "succeeded") await showPlot(c);
        return;
      }
    } catch (e) {
      if (mine !== follow) return;
      showError($("lc-error"), e);
      if (e.status === 404 || e.status === 401) return;
      if (e.status === 429) await sleep(5 * POLL_MS); // rate-limited: back off
    }
    await sleep(POLL_MS);
    if (mine !== follow) return;
  }
}

export function initCurves() {
  $("lc-form").addEventListener("submit", start);
  $("lc-refresh").addEventListener("click", refreshCurves);
}
