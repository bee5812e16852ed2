// Token probabilities: a span per sampled token coloured by its probability, and one shared
// tooltip listing the top alternatives when the pointer rests on a token.

import { $, el } from "./ui.js";

/** Completions give {token: logprob}; chat gives [{token, logprob}]: both become [[token, lp]]. */
export function alternatives(top) {
  if (!top) return [];
  const pairs = Array.isArray(top) ? top.map((t) => [t.token, t.logprob]) : Object.entries(top);
  return pairs.sort((a, b) => b[1] - a[1]);
}

const pct = (lp) => `${(Math.exp(lp) * 100).toFixed(lp > Math.log(0.001) ? 1 : 3)}%`;

/**
 * A span for one token (or `n` byte tokens spelling one character): class p0 (unlikely) .. p9
 * (near certain) by its probability, its (first token's) alternatives in data-top.
 */
export function tokenSpan(token, logprob, top, n = 1) {
  const p = logprob === null || logprob === undefined ? 1 : Math.exp(logprob);
  const span = el("span", { class: `tok p${Math.min(9, Math.floor(p * 10))}`, text: token });
  span.dataset.token = token;
  span.dataset.logprob = logprob ?? "";
  span.dataset.top = JSON.stringify(alternatives(top).slice(0, 8));
  if (n > 1) span.dataset.n = String(n);
  return span;
}

function show(target, x, y) {
  const tip = $("tooltip");
  const top = JSON.parse(target.dataset.top || "[]");
  const lp = target.dataset.logprob === "" ? null : Number(target.dataset.logprob);
  const rows = top.map(([tok, v]) =>
    el("tr", { class: tok === target.dataset.token ? "chosen" : "" },
      el("td", { class: "mono", text: JSON.stringify(tok) }), el("td", { class: "num", text: pct(v) })),
  );
  tip.replaceChildren(
    el("div", { class: "tip-head" }, el("span", { class: "mono", text: JSON.stringify(target.dataset.token) }),
      " ", el("b", { text: lp === null ? "" : pct(lp) }),
      target.dataset.n ? el("span", { class: "hint", text: ` · ${target.dataset.n} byte tokens` }) : ""),
    rows.length ? el("table", {}, rows) : el("div", { class: "hint", text: "no alternatives returned" }),
  );
  tip.hidden = false;
  const w = tip.offsetWidth;
  tip.style.left = `${Math.min(x + 12, window.innerWidth - w - 8)}px`;
  tip.style.top = `${y + 16}px`;
}

export function installTooltip() {
  document.addEventListener("mouseover", (e) => {
    const t = e.target.closest?.(".tok[data-top]");
    if (t) show(t, e.clientX, e.clientY);
  });
  document.addEventListener("mouseout", (e) => {
    if (e.target.closest?.(".tok[data-top]")) $("tooltip").hidden = true;
  });
}
