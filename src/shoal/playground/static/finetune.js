// The Fine-tune tab: upload a JSONL file, start a job (every setting "auto" unless given), the
// org's jobs, and one job followed live (polled every second while it runs): status, loss chart,
// checkpoints, events, its error, and a button to try the new model.

import { get, post } from "./api.js";
import { lineChart } from "./chart.js";
import { loadModels } from "./models.js";
import { $, el, fmtInt, fmtNum, fmtTime, numberOrAuto, showError, sleep } from "./ui.js";

const DONE = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;
let follow = 0; // bumped to stop the poller of the job shown before
let tryModel = () => {};

async function upload() {
  const file = $("ft-file").files[0];
  if (!file) return showError($("ft-error"), new Error("Choose a JSONL file first."));
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  $("ft-upload").disabled = true;
  try {
    const f = await post("/v1/files", form);
    showError($("ft-error"), null);
    $("ft-file-info").replaceChildren(
      el("code", { "data-testid": "ft-file-id", text: f.id }),
      ` · ${f.filename} · `, el("span", { "data-testid": "ft-file-bytes", text: fmtInt(f.bytes) }), " bytes");
    $("ft-training-file").value = f.id;
    $("lc-training-file").value = f.id;
  } catch (e) {
    showError($("ft-error"), e);
  } finally {
    $("ft-upload").disabled = false;
  }
}

async function start(ev) {
  ev.preventDefault();
  const hp = { n_epochs: numberOrAuto($("ft-epochs")), batch_size: numberOrAuto($("ft-batch")),
               learning_rate_multiplier: numberOrAuto($("ft-lr")) };
  const body = { model: $("ft-model").value, training_file: $("ft-training-file").value.trim(),
                 seed: numberOrAuto($("ft-seed")), suffix: $("ft-suffix").value.trim() || undefined,
                 hyperparameters: Object.fromEntries(Object.entries(hp).filter(([, v]) => v !== undefined)) };
  try {
    const job = await post("/v1/fine_tuning/jobs", body);
    showError($("ft-error"), null);
    await refreshJobs();
    openJob(job.id);
  } catch (e) {
    showError($("ft-error"), e);
  }
}

function jobRow(j) {
  return el("tr", { class: "clickable", "data-testid": "ft-job-row", dataset: { id: j.id }, onclick: () => openJob(j.id) },
    el("td", { class: "mono", text: j.id }), el("td", {}, el("span", { class: `badge ${j.status}`, text: j.status })),
    el("td", { class: "mono", text: j.fine_tuned_model || j.user_provided_suffix || j.model }));
}

export async function refreshJobs() {
  try {
    const jobs = (await get("/v1/fine_tuning/jobs?limit=50")).data;
    $("ft-jobs").tBodies[0].replaceChildren(...jobs.map(jobRow));
  } catch (e) {
    showError($("ft-error"), e);
  }
}

function facts(job) {
  const h = job.hyperparameters || {};
  const rows = [
    ["Base model", job.model], ["Training file", job.training_file],
    ["Validation file", job.validation_file], ["Epochs", h.n_epochs], ["Batch size", h.batch_size],
    ["LR multiplier", h.learning_rate_multiplier], ["Seed", job.seed],
    ["Trained tokens", job.trained_tokens ? fmtInt(job.trained_tokens) : null],
    ["Created", fmtTime(job.created_at)], ["Finished", job.finished_at ? fmtTime(job.finished_at) : null],
    ["Estimated finish", job.estimated_finish ? fmtTime(job.estimated_finish) : null],
    ["Fine-tuned model", job.fine_tuned_model],
  ];
  return rows.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { class: "mono", text: String(v) })]);
}

function chart(events) {
  const metrics = events.filter((e) => e.type === "metrics").map((e) => e.data).reverse();
  const series = (key) => metrics.filter((d) => d[key] !== undefined && d[key] !== null).map((d) => [d.step, d[key]]);
  const svg = lineChart({
    xLabel: "step", yLabel: "loss",
    series: [
      { name: "train loss", cls: "s-train", points: series("train_loss") },
      { name: "validation loss", cls: "s-valid", points: series("valid_loss"), dots: true },
      { name: "full validation loss", cls: "s-full", points: series("full_valid_loss"), dots: true },
    ],
  });
  svg.setAttribute("data-testid", "loss-chart");
  return svg;
}

function render(job, events, checkpoints) {
  $("job-view").hidden = false;
  $("ft-jobs").querySelector(`tr[data-id="${job.id}"]`)?.replaceWith(jobRow(job));
  $("job-id").textContent = job.id;
  $("job-status").textContent = job.status;
  $("job-status").className = `badge ${job.status}`;
  $("job-facts").replaceChildren(...facts(job));
  showError($("job-error"), job.error ? { message: `${job.error.message}`, code: job.error.code } : null);
  $("try-model").hidden = !(job.status === "succeeded" && job.fine_tuned_model);
  $("try-model").onclick = () => tryModel(job.fine_tuned_model);
  $("job-cancel").hidden = DONE.has(job.status);
  $("job-cancel").onclick = async () => {
    try {
      render(await post(`/v1/fine_tuning/jobs/${job.id}/cancel`), events, checkpoints);
    } catch (e) {
      showError($("job-error"), e);
    }
  };
  $("loss-chart-box").replaceChildren(chart(events));
  $("job-checkpoints").replaceChildren(...checkpoints.map((c) =>
    el("li", {}, el("code", { text: c.fine_tuned_model_checkpoint }),
      ` step ${c.step_number}`, c.metrics?.train_loss !== undefined ? ` · train loss ${fmtNum(c.metrics.train_loss)}` : "",
      " ", el("button", { type: "button", class: "ghost small", text: "Try",
                          onclick: () => tryModel(c.fine_tuned_model_checkpoint) }))));
  if (!checkpoints.length) $("job-checkpoints").append(el("li", { class: "hint", text: "none yet" }));
  const latest = events.find((e) => e.type === "metrics");
  const shown = events.filter((e) => e.type !== "metrics" || e === latest).slice(0, 200);
  $("job-events").replaceChildren(...shown.map((e) =>
    el("li", { class: `level-${e.level}` }, el("time", { text: new Date(e.created_at * 1000).toLocaleTimeString() }),
      " ", e.message)));
}

/** Show job `id` and poll it every second until it ends. */
export async function openJob(id) {
  const mine = ++follow;
  for (;;) {
    try {
      const [job, events, cks] = await Promise.all([
        get(`/v1/fine_tuning/jobs/${id}`),
        get(`/v1/fine_tuning/jobs/${id}/events?limit=1000`),
        get(`/v1/fine_tuning/jobs/${id}/checkpoints?limit=100`),
      ]);
      if (mine !== follow) return;
      render(job, events.data, cks.data);
      if (DONE.has(job.status)) {
        if (job.status === "succeeded") await loadModels().catch(() => {}); // its model is new
        return;
      }
    } catch (e) {
      if (mine !== follow) return;
      showError($("job-error"), e);
      if (e.status === 404 || e.status === 401) return;
      if (e.status === 429) await sleep(5 * POLL_MS); // rate-limited: back off
    }
    await sleep(POLL_MS);
    if (mine !== follow) return;
  }
}

export function initFinetune(onTry) {
  tryModel = onTry;
  $("ft-upload").addEventListener("click", upload);
  $("ft-form").addEventListener("submit", start);
  $("ft-refresh").addEventListener("click", refreshJobs);
}
