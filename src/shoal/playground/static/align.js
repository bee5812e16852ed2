// Lines up token strings with the text they spell. A token that is only part of a character
// (byte-level BPE) decodes alone to U+FFFD, so a run of such tokens is grouped with the text
// that lies before the next whole token (split per character when each token is one byte).
// Works on a stream: `drain` returns only settled groups.

const PARTIAL = "\uFFFD";
const partial = (t) => t.token === "" || t.token.includes(PARTIAL);

const encoder = new TextEncoder();

/** A run of one-byte tokens spelling several characters: one group per character. */
function split(text, toks) {
  const chars = [...text];
  if (chars.length < 2 || toks.length < 2 || encoder.encode(text).length !== toks.length) {
    return [{ text, toks }];
  }
  let at = 0;
  return chars.map((ch) => {
    const n = encoder.encode(ch).length;
    at += n;
    return { text: ch, toks: toks.slice(at - n, at) };
  });
}

export class Aligner {
  constructor() {
    this.toks = [];
    this.text = "";
  }

  /** Add tokens ({token, ...}) and the text they produced. */
  push(tokens, text) {
    this.toks.push(...tokens);
    this.text += text;
  }

  /** Settled groups [{text, toks}]; `final` flushes the rest (text with no tokens has toks []). */
  drain(final = false) {
    const out = [];
    while (this.toks.length) {
      let k = 0;
      while (k < this.toks.length && partial(this.toks[k])) k++;
      let end;
      if (k < this.toks.length) {
        const i = this.text.indexOf(this.toks[k].token);
        if (i < 0 && final) { // never spelled (a special token, or cut by a stop): no text
          out.push({ text: "", toks: this.toks.splice(0, k + 1) });
          continue;
        }
        if (i < 0) break; // its text has not arrived yet
        if (k > 0) end = i; // a run of partial tokens spells what comes before the next token
        else [end, k] = [i + this.toks[0].token.length, 1];
      } else if (final) {
        end = this.text.length;
      } else {
        break; // the run may continue
      }
      out.push(...split(this.text.slice(0, end), this.toks.splice(0, k)));
      this.text = this.text.slice(end);
    }
    if (final) {
      if (this.text) out.push({ text: this.text, toks: [] });
      this.text = "";
      this.toks = [];
    }
    return out;
  }
}

/** All groups of a finished text and its token strings at once. */
export function alignAll(text, tokenStrs) {
  const a = new Aligner();
  a.push(tokenStrs.map((token, i) => ({ token, i })), text);
  return a.drain(true);
}
