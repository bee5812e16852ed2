// The model list (GET /v1/models) shared by every picker on the page: `.model-select` lists all
// models (base, shared adapters, fine-tuned, checkpoints); `.base-select` only what can be tuned.

import { get } from "./api.js";
import { el } from "./ui.js";

let models = [];

const isTuned = (id) => id.startsWith("ft:");
const isCheckpoint = (id) => /:ckpt-step-\d+$/.test(id);

export function modelIds() {
  return models.map((m) => m.id);
}

function groups(ids) {
  return [
    ["Base and shared", ids.filter((id) => !isTuned(id))],
    ["Fine-tuned", ids.filter((id) => isTuned(id) && !isCheckpoint(id))],
    ["Checkpoints", ids.filter((id) => isTuned(id) && isCheckpoint(id))],
  ].filter(([, list]) => list.length);
}

function fill(select, ids, wanted) {
  const keep = wanted ?? select.value;
  select.replaceChildren(
    ...groups(ids).map(([label, list]) =>
      el("optgroup", { label }, list.map((id) => el("option", { value: id, text: id }))),
    ),
  );
  if (ids.includes(keep)) select.value = keep;
}

/** Reload the list and refill every picker, keeping each one's choice when it still exists. */
export async function loadModels() {
  models = (await get("/v1/models")).data;
  const ids = modelIds();
  for (const s of document.querySelectorAll(".model-select")) fill(s, ids);
  for (const s of document.querySelectorAll(".base-select")) fill(s, ids.filter((id) => !isTuned(id)));
  return ids;
}

/** The main picker's model (the one Complete/Chat and the tokenizer default to). */
export function currentModel() {
  return document.querySelector('[data-testid="model"]').value || models[0]?.id || "";
}
