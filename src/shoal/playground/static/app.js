// The playground's entry point: tabs (kept in the URL hash), the API key box, the model list,
// and "try this model", which takes a fine-tuned model to the Complete tab.

import { hasOwnKey, saveKey } from "./api.js";
import { initComplete, setMode } from "./complete.js";
import { initCurves, refreshCurves } from "./curves.js";
import { initFinetune, refreshJobs } from "./finetune.js";
import { loadModels } from "./models.js";
import { initPresets } from "./presets.js";
import { installTooltip } from "./probs.js";
import { initTokenizer } from "./tokenizer.js";
import { $, showError } from "./ui.js";
import { initUsage, refreshUsage } from "./usage.js";

const ON_SHOW = { finetune: refreshJobs, curves: refreshCurves, usage: refreshUsage };

function showTab(name) {
  if (!document.querySelector(`[data-panel="${name}"]`)) name = "complete";
  for (const b of document.querySelectorAll("[data-tab]")) {
    b.classList.toggle("active", b.dataset.tab === name);
    b.setAttribute("aria-selected", String(b.dataset.tab === name));
  }
  for (const p of document.querySelectorAll("[data-panel]")) p.classList.toggle("active", p.dataset.panel === name);
  if (location.hash.slice(1) !== name) history.replaceState(null, "", `#${name}`);
  ON_SHOW[name]?.();
}

async function refreshModels() {
  try {
    await loadModels();
    showError($("global-error"), null);
  } catch (e) {
    showError($("global-error"), e);
    if (e.status === 401) $("settings").open = true;
  }
}

function keyState() {
  $("key-state").textContent = hasOwnKey() ? "saved" : "none (open mode)";
  $("key-state").className = hasOwnKey() ? "ok" : "muted";
}

function initSettings() {
  keyState();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    saveKey($("api-key").value.trim());
    $("api-key").value = "";
    keyState();
    $("settings").open = false;
    refreshModels();
    showTab(location.hash.slice(1) || "complete");
  });
  $("clear-key").addEventListener("click", () => {
    saveKey("");
    keyState();
    refreshModels();
  });
}

async function tryModel(name) {
  await refreshModels();
  const select = $("model");
  if (![...select.options].some((o) => o.value === name)) {
    showError($("global-error"), new Error(`Model ${name} is not in the model list yet.`));
    return;
  }
  select.value = name;
  select.dispatchEvent(new Event("change"));
  setMode("complete");
  showTab("complete");
  $("prompt").focus();
}

function init() {
  initSettings();
  initComplete();
  initPresets();
  initTokenizer();
  initFinetune(tryModel);
  initCurves();
  initUsage();
  installTooltip();
  for (const b of document.querySelectorAll("[data-tab]")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("refresh-models").addEventListener("click", refreshModels);
  $("model").addEventListener("change", () => { $("tok-model").value = $("model").value; });
  window.addEventListener("hashchange", () => showTab(location.hash.slice(1)));
  showTab(location.hash.slice(1) || "complete");
  refreshModels().then(() => document.body.setAttribute("data-ready", "1"));
}

init();
