// Small DOM helpers shared by the tabs: element lookup by data-testid, element building,
// error boxes, number formatting, debouncing.

export const $ = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);

/** el("td", {class: "x", dataset: {id}}, "text", child) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null && c !== false) node.append(c);
  }
  return node;
}

export function showError(box, err) {
  if (!err) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  const status = err.status ? ` (${err.status}${err.code ? ` ${err.code}` : ""})` : "";
  box.textContent = `${err.message || err}${status}`;
  box.hidden = false;
  if (err.status === 401) box.textContent += " — set your API key (top right).";
}

export const fmtInt = (n) => (n ?? 0).toLocaleString("en-US");

export function fmtCost(usd) {
  if (usd === null || usd === undefined) return "—";
  if (usd === 0) return "$0";
  return usd < 0.01 ? `$${usd.toPrecision(2)}` : `$${usd.toFixed(4)}`;
}

export function fmtNum(x, digits = 4) {
  return x === null || x === undefined ? "—" : Number(x).toPrecision(digits);
}

export function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "—";
}

export function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

/** A number input's value, or undefined when it is empty ("auto"). */
export function numberOrAuto(input) {
  const v = input.value.trim();
  return v === "" ? undefined : Number(v);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
