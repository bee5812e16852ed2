// The Complete / Chat tab: a prompt or a message list, sampling settings, and a streamed answer
// per choice, with token usage (from the usage chunk), its cost when the model has a price, and
// optionally every token coloured by its probability.

import { get, stream } from "./api.js";
import { currentModel } from "./models.js";
import { Aligner } from "./align.js";
import { tokenSpan } from "./probs.js";
import { $, el, fmtCost, fmtInt, numberOrAuto, showError } from "./ui.js";

const ROLES = ["system", "user", "assistant"];
let controller = null;

export const mode = () => document.querySelector('input[name="mode"]:checked').value;

export function setMode(m) {
  document.querySelector(`input[name="mode"][value="${m}"]`).checked = true;
  $("prompt").hidden = m !== "complete";
  $("chat").hidden = m !== "chat";
}

function addMessage(role = "user", content = "") {
  const row = el("div", { class: "message", "data-testid": "message" },
    el("select", { "data-testid": "message-role" }, ROLES.map((r) => el("option", { value: r, text: r }))),
    el("textarea", { "data-testid": "message-content", rows: 2, spellcheck: "false",
                     placeholder: role === "system" ? "How the assistant should behave" : "Message" }),
    el("button", { type: "button", class: "ghost icon", title: "Remove", "data-testid": "remove-message",
                   onclick: () => row.remove() }, "×"),
  );
  row.querySelector("select").value = role;
  row.querySelector("textarea").value = content;
  $("messages").append(row);
}

function messages() {
  return [...$("messages").querySelectorAll(".message")].map((row) => ({
    role: row.querySelector("select").value, content: row.querySelector("textarea").value,
  }));
}

/** "a, b" or one per line; `\n` and `\t` written out stand for a newline and a tab. */
export function parseStops(raw) {
  const parts = raw.includes("\n") ? raw.split("\n") : raw.split(",");
  return parts.map((s) => s.trim()).filter(Boolean)
    .map((s) => s.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]));
}

/** Fill the form from a preset: {mode, prompt, messages, temperature, max_tokens, top_p, n, stop, json}. */
export function applyPreset(p) {
  setMode(p.mode || "complete");
  if (p.prompt !== undefined) $("prompt").value = p.prompt;
  if (p.messages) {
    $("messages").replaceChildren();
    p.messages.forEach((m) => addMessage(m.role, m.content));
  }
  const set = (id, v) => {
    const input = $(id);
    input.value = v;
    input.dispatchEvent(new Event("input"));
  };
  set("temperature", p.temperature ?? 0.7);
  set("max-tokens", p.max_tokens ?? 64);
  set("top-p", p.top_p ?? 1);
  set("n", p.n ?? 1);
  set("stop-seqs", (p.stop || []).map((s) => s.replace(/\n/g, "\\n")).join(", "));
  $("json-mode").checked = Boolean(p.json);
  $("json-mode").dispatchEvent(new Event("change"));
  $("outputs").replaceChildren();
  $("usage").textContent = "";
}

function request(chat, probs) {
  const body = {
    model: currentModel(), stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value), n: numberOrAuto($("n")) ?? 1,
    seed: numberOrAuto($("seed")),
  };
  const stops = parseStops($("stop-seqs").value);
  if (stops.length) body.stop = stops;
  if ($("json-mode").checked) {
    const text = $("json-schema").value.trim();
    let schema = null;
    if (text) {
      try {
        schema = JSON.parse(text);
      } catch (e) {
        throw new Error(`JSON schema: not JSON (${e.message})`);
      }
    }
    body.response_format = schema
      ? { type: "json_schema", json_schema: { name: "playground", schema, strict: true } }
      : { type: "json_object" };
  }
  if (chat) {
    body.messages = messages();
    if (probs) Object.assign(body, { logprobs: true, top_logprobs: 5 });
  } else {
    body.prompt = $("prompt").value;
    if (probs) body.logprobs = 5;
  }
  return body;
}

function outputBox(i, chat, probs) {
  const text = el("div", { class: "output-text", "data-testid": `output-${i}` });
  const finish = el("span", { class: "badge", "data-testid": `finish-${i}` });
  const reuse = el("button", { type: "button", class: "ghost small", hidden: true,
    text: chat ? "Add as assistant message" : "Append to prompt",
    onclick: () => {
      if (chat) addMessage("assistant", text.textContent);
      else $("prompt").value += text.textContent;
    } });
  const box = el("div", { class: "output", "data-testid": "output" },
    el("div", { class: "output-head" }, el("span", { text: `Choice ${i + 1}` }), finish, reuse), text);
  $("outputs").append(box);
  return { text, finish, reuse, aligner: probs ? new Aligner() : null };
}

/** One coloured span per group of tokens (a character may take several byte tokens). */
function render(box, groups) {
  for (const g of groups) {
    if (!g.text) continue;
    if (!g.toks.length) {
      box.text.append(g.text);
      continue;
    }
    const lps = g.toks.map((t) => t.logprob);
    const lp = lps.some((v) => v === null || v === undefined) ? null : lps.reduce((a, b) => a + b, 0);
    box.text.append(tokenSpan(g.text, lp, g.toks[0].top, g.toks.length));
  }
}

/** Append one streamed piece; with probabilities, only the tokens whose text has settled. */
function appendPiece(box, text, tokens) {
  if (!box.aligner) {
    if (text) box.text.append(text);
    return;
  }
  box.aligner.push(tokens || [], text);
  render(box, box.aligner.drain());
}

function pieces(choice, chat) {
  if (chat) {
    const text = choice.delta?.content ?? "";
    const content = choice.logprobs?.content;
    return [text, content?.map((c) => ({ token: c.token, logprob: c.logprob, top: c.top_logprobs }))];
  }
  const lp = choice.logprobs;
  const tokens = lp?.tokens?.map((token, k) => ({
    token, logprob: lp.token_logprobs[k], top: lp.top_logprobs?.[k] }));
  return [choice.text ?? "", tokens];
}

/** Money spent on `model` by completions and chat so far, or null when usage can't be read. */
async function spent(model) {
  try {
    const rows = (await get("/v1/usage")).data;
    return rows.filter((r) => r.model === model && (r.kind === "completions" || r.kind === "chat"))
      .reduce((sum, r) => sum + (r.cost_usd || 0), 0);
  } catch {
    return null;
  }
}

async function submit() {
  const chat = mode() === "chat";
  const probs = $("show-probs").checked;
  showError($("complete-error"), null);
  let body;
  try {
    body = request(chat, probs);
  } catch (e) {  // (a schema that is not JSON: said before anything is sent)
    showError($("complete-error"), e);
    return;
  }
  $("outputs").replaceChildren();
  $("outputs").classList.toggle("probs", probs);
  $("usage").textContent = "Generating…";
  delete $("usage").dataset.totalTokens;
  const boxes = Array.from({ length: body.n }, (_, i) => outputBox(i, chat, probs));
  controller = new AbortController();
  $("submit").disabled = true;
  $("stop").disabled = false;
  const before = await spent(body.model);
  const t0 = performance.now();
  let usage = null;
  try {
    const path = chat ? "/v1/chat/completions" : "/v1/completions";
    for await (const chunk of stream(path, body, controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const box = boxes[choice.index] ?? (boxes[choice.index] = outputBox(choice.index, chat, probs));
        const [text, tokens] = pieces(choice, chat);
        appendPiece(box, text, tokens);
        if (choice.finish_reason) box.finish.textContent = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError($("complete-error"), e);
  } finally {
    controller = null;
    $("submit").disabled = false;
    $("stop").disabled = true;
    for (const b of boxes) {
      if (b.aligner) render(b, b.aligner.drain(true));
      b.reuse.hidden = false;
    }
  }
  const secs = ((performance.now() - t0) / 1000).toFixed(1);
  if (!usage) {
    $("usage").textContent = `Stopped after ${secs} s`;
    return;
  }
  let line = `${fmtInt(usage.prompt_tokens)} prompt + ${fmtInt(usage.completion_tokens)} completion = `
    + `${fmtInt(usage.total_tokens)} tokens · ${secs} s`;
  const after = before === null ? null : await spent(body.model);
  if (after !== null && after - before > 0) line += ` · cost ${fmtCost(after - before)}`;
  $("usage").textContent = line;
  $("usage").dataset.totalTokens = usage.total_tokens;
}

export function initComplete() {
  for (const input of document.querySelectorAll('input[name="mode"]')) {
    input.addEventListener("change", () => setMode(mode()));
  }
  for (const out of document.querySelectorAll("output[data-for]")) {
    const input = $(out.dataset.for);
    const update = () => { out.textContent = input.value; };
    input.addEventListener("input", update);
    update();
  }
  addMessage("system", "You are a helpful assistant.");
  addMessage("user", "");
  $("add-message").addEventListener("click", () => {
    const last = messages().at(-1);
    addMessage(last?.role === "user" ? "assistant" : "user");
  });
  $("json-mode").addEventListener("change", () => { $("json-schema-box").hidden = !$("json-mode").checked; });
  $("submit").addEventListener("click", submit);
  $("stop").addEventListener("click", () => controller?.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit();
  });
}
