// The Tokenizer tab: text -> coloured token chips and a count, live (debounced) through
// POST /v1/tokenize; a sample puts English, Swedish and Japanese side by side.

import { alignAll } from "./align.js";
import { post } from "./api.js";
import { $, debounce, el, fmtInt, showError } from "./ui.js";

const SAMPLES = [
  ["English", "The weather is lovely today, so we are going for a walk by the sea."],
  ["Swedish", "Vädret är underbart i dag, så vi ska ta en promenad längs havet."],
  ["Japanese", "今日は天気がとても良いので、海辺を散歩しに行きます。"],
];

const model = () => $("tok-model").value;

async function tokenize(text) {
  return post("/v1/tokenize", { model: model(), prompt: text, add_special_tokens: false });
}

/** Visible whitespace: a newline shows as ↵ and a tab as →, so every chip has width. */
const visible = (s) => (s === "" ? "∅" : s.replace(/\n/g, "↵").replace(/\t/g, "→"));

/** A chip per token; byte tokens that only together spell a character share one chip. */
function chips(text, result) {
  return alignAll(text, result.token_strs).map((g, k) => {
    const ids = g.toks.map((t) => result.tokens[t.i]);
    const chip = el("span", { class: `chip c${k % 6}`, "data-testid": "tok-chip", "data-n": ids.length,
                              title: ids.length ? `${ids.length === 1 ? "id" : `${ids.length} byte tokens, ids`} ${ids.join(" ")}` : "" },
      visible(g.text || g.toks.map((t) => t.token).join("")));
    if (ids.length > 1) chip.append(el("sub", { text: `×${ids.length}` }));
    return chip;
  });
}

let seq = 0;

async function update() {
  const text = $("tok-input").value;
  const mine = ++seq;
  if (!text) {
    $("tok-chips").replaceChildren();
    $("tok-count").textContent = "";
    return;
  }
  try {
    const r = await tokenize(text);
    if (mine !== seq) return; // a newer edit already asked
    showError($("tok-error"), null);
    $("tok-chips").replaceChildren(...chips(text, r));
    const chars = [...text].length;
    $("tok-count").replaceChildren(
      el("b", { "data-testid": "tok-count-value", text: fmtInt(r.count) }), ` tokens · ${fmtInt(chars)} characters`
      + ` · ${(r.count / chars).toFixed(2)} tokens per character · context ${fmtInt(r.max_model_len)} tokens`);
  } catch (e) {
    if (mine === seq) showError($("tok-error"), e);
  }
}

async function samples() {
  try {
    const results = await Promise.all(SAMPLES.map(([, text]) => tokenize(text)));
    showError($("tok-error"), null);
    $("tok-samples").replaceChildren(...SAMPLES.map(([lang, text], i) => {
      const r = results[i];
      const chars = [...text].length;
      return el("div", { class: "sample card", "data-testid": "tok-sample-card" },
        el("h3", {}, lang, " ", el("span", { class: "badge", "data-testid": "tok-sample-count",
                                            text: `${r.count} tokens` })),
        el("p", { class: "sample-text", text }),
        el("p", { class: "hint", text: `${chars} characters · ${(r.count / chars).toFixed(2)} tokens per character` }),
        el("div", { class: "chips small" }, chips(text, r)));
    }));
  } catch (e) {
    showError($("tok-error"), e);
  }
}

export function initTokenizer() {
  $("tok-input").addEventListener("input", debounce(update, 250));
  $("tok-model").addEventListener("change", update);
  $("tok-sample").addEventListener("click", samples);
}
