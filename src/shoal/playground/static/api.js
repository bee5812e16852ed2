// The API client: the key from localStorage as a Bearer token, OpenAI's error envelope turned
// into an ApiError with the server's message, and server-sent events as an async iterator.

const KEY = "shoal.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY) || "EMPTY";
}

export function hasOwnKey() {
  return Boolean(localStorage.getItem(KEY));
}

export function saveKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(message, status = 0, code = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

async function failure(res) {
  let err = null;
  try {
    err = (await res.json()).error;
  } catch {
    // not JSON: fall back to the status line
  }
  const msg = err?.message || `${res.status} ${res.statusText || "error"}`;
  return new ApiError(msg, res.status, err?.code ?? null, err?.param ?? null);
}

async function send(method, path, body, signal) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  let payload;
  if (body instanceof FormData) payload = body;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let res;
  try {
    // relative to the page, so the playground also works behind a proxy under a path prefix
    res = await fetch(path.replace(/^\//, ""), { method, headers, body: payload, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`Could not reach the server (${e.message})`);
  }
  if (!res.ok) throw await failure(res);
  return res;
}

/** JSON from `method path` (or text with {text: true}); throws ApiError with the server's message. */
export async function api(method, path, body, { text = false, signal } = {}) {
  const res = await send(method, path, body, signal);
  return text ? res.text() : res.json();
}

export const get = (path, opts) => api("GET", path, undefined, opts);
export const post = (path, body, opts) => api("POST", path, body, opts);

/** Yield each `data: {...}` event of a streamed POST until `[DONE]`; an error event throws. */
export async function* stream(path, body, signal) {
  const res = await send("POST", path, body, signal);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (!line.startsWith("data:")) continue; // blank separators and ": ping" comments
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) {
        const e = event.error;
        throw new ApiError(e.message || "stream error", 0, e.code ?? null, e.param ?? null);
      }
      yield event;
    }
  }
}
