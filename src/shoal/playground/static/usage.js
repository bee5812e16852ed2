// The Usage tab: tokens, requests and cost per day and model (GET /v1/usage?by=day).

import { get } from "./api.js";
import { $, el, fmtCost, fmtInt, showError } from "./ui.js";

const num = (v) => el("td", { class: "num", text: fmtInt(v) });

export async function refreshUsage() {
  try {
    const r = await get("/v1/usage?by=day");
    showError($("usage-error"), null);
    const rows = [...r.data].sort((a, b) => (a.day === b.day ? a.model.localeCompare(b.model) : a.day < b.day ? 1 : -1));
    const table = $("usage-table");
    table.tBodies[0].replaceChildren(...rows.map((u) =>
      el("tr", { "data-testid": "usage-row" }, el("td", { text: u.day }), el("td", { class: "mono", text: u.model }),
        num(u.num_requests), num(u.prompt_tokens), num(u.completion_tokens), num(u.total_tokens),
        el("td", { class: "num", text: fmtCost(u.cost_usd) }))));
    if (!rows.length) {
      table.tBodies[0].append(el("tr", {}, el("td", { colspan: 7, class: "hint", text: "No usage yet." })));
    }
    const sum = (k) => rows.reduce((s, u) => s + (u[k] || 0), 0);
    table.tFoot.replaceChildren(el("tr", {}, el("th", { text: "Total" }), el("th"),
      num(sum("num_requests")), num(sum("prompt_tokens")), num(sum("completion_tokens")), num(sum("total_tokens")),
      el("td", { class: "num", "data-testid": "usage-total-cost", text: fmtCost(r.total_cost_usd) })));
  } catch (e) {
    showError($("usage-error"), e);
  }
}

export function initUsage() {
  $("usage-refresh").addEventListener("click", refreshUsage);
}
