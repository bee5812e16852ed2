"""Commands that talk to a running server: `complete`, `chat`, `files`, `models`, `usage` and
`tokenize`. Each opens a `Server` (`remote.py`) from `--base-url`/`--api-key`; any API or
connection failure becomes one `shoal: error:` line. Fine-tuning and learning curves are in
`finetune.py`, the load test in `bench.py`. Nothing here imports torch or the engine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time

from .admin import _when, table
from .remote import Server, add_connection_args, error_line, talks_to_server


def _unescape(s: str) -> str:
    """`\\n` and `\\t` as typed in a shell become the characters."""
    return s.replace("\\n", "\n").replace("\\t", "\t")


# --- complete and chat -------------------------------------------------------------------------

@talks_to_server
def cmd_complete(args: argparse.Namespace) -> int:
    """Stream a completion for PROMPT (`-` reads it from stdin) from the server; the usage goes
    to stderr. Without --model, the server's base model."""
    srv = Server(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = args.model or srv.default_model()
    kw = dict(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=args.temperature,
              top_p=args.top_p, n=args.n, seed=args.seed, logprobs=args.logprobs,
              stop=[_unescape(s) for s in args.stop] if args.stop else None,
              extra_body={"response_format": response_format(args)} if args.json or args.schema else None)
    t0 = time.perf_counter()
    stream = srv.openai.completions.create(**{k: v for k, v in kw.items() if v is not None},
                                           stream=True, stream_options={"include_usage": True})
    others: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    logprobs: list[tuple] = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            if c.index == 0:  # the first choice streams; others print when all are done
                sys.stdout.write(c.text)
                sys.stdout.flush()
                lp = c.logprobs
                if lp and lp.tokens:
                    tops = lp.top_logprobs or [None] * len(lp.tokens)
                    logprobs += zip(lp.tokens, lp.token_logprobs or [], tops)
            else:
                others.setdefault(c.index, []).append(c.text)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    sys.stdout.write("\n")
    for i in sorted(others):
        sys.stdout.write(f"--- choice {i} ---\n{''.join(others[i])}\n")
    sys.stdout.flush()
    dt_s = time.perf_counter() - t0
    if logprobs:
        table([("TOKEN", "LOGPROB", "TOP")] + [
            (repr(t), f"{p:.4f}", "  ".join(f"{k!r}:{v:.2f}" for k, v in (top or {}).items()))
            for t, p, top in logprobs], out=sys.stderr)
    n_out = usage.completion_tokens if usage else 0
    print(f"[{model}: {usage.prompt_tokens if usage else '?'} prompt + {n_out} completion tokens "
          f"in {dt_s:.2f}s ({n_out / dt_s if dt_s > 0 else 0:.1f} tok/s), finish: "
          f"{', '.join(finish[i] for i in sorted(finish)) or '?'}]", file=sys.stderr)
    return 0


def response_format(args: argparse.Namespace) -> dict | None:
    """`--schema FILE` (a JSON Schema: Structured Outputs) or `--json` (JSON mode) as OpenAI's
    `response_format`; None without either."""
    if args.schema:
        try:
            with open(args.schema, encoding="utf-8") as f:
                schema = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--schema: cannot read a JSON schema from {args.schema}: {e}") from None
        name = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(os.path.basename(args.schema))[0])[:64] or "schema"
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    return {"type": "json_object"} if args.json else None


def _read_line(tty: bool) -> str | None:
    if tty:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


@talks_to_server
def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a model: one message per line on stdin until EOF or `/exit` (`/reset` starts
    over); each answer streams to stdout, the conversation is kept."""
    import openai

    srv = Server(args)
    fmt = response_format(args)
    model = args.model or srv.default_model()
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {model} at {srv.url}; /exit or Ctrl-D quits, /reset starts over",
              file=sys.stderr)
    turns = prompt_tokens = completion_tokens = 0
    while (line := _read_line(tty)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": text})
        kw = dict(temperature=args.temperature, max_tokens=args.max_tokens, response_format=fmt)
        try:
            stream = srv.openai.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True},
                **{k: v for k, v in kw.items() if v is not None})
            reply = []
            for chunk in stream:
                if chunk.usage:
                    prompt_tokens += chunk.usage.prompt_tokens
                    completion_tokens += chunk.usage.completion_tokens
                for c in chunk.choices:
                    if c.delta.content:
                        reply.append(c.delta.content)
                        sys.stdout.write(c.delta.content)
                        sys.stdout.flush()
        except openai.BadRequestError as e:  # e.g. the conversation outgrew the context
            messages.pop()
            print(f"shoal: error: {error_line(e, srv.url)} (/reset starts over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        turns += 1
    print(f"[{model}: {turns} turn(s), {prompt_tokens} prompt + {completion_tokens} completion "
          f"tokens]", file=sys.stderr)
    return 0


# --- files, models, usage, tokenize ------------------------------------------------------------

@talks_to_server
def cmd_files(args: argparse.Namespace) -> int:
    """Upload, list or delete your organization's files on the server."""
    srv = Server(args)
    if args.action == "upload":
        if not os.path.isfile(args.path):
            raise ValueError(f"path: no such file: {args.path}")
        with open(args.path, "rb") as f:
            row = srv.openai.files.create(file=(os.path.basename(args.path), f), purpose=args.purpose)
        print(row.id)
        print(f"uploaded {row.filename}: {row.bytes} bytes, purpose {row.purpose}", file=sys.stderr)
        return 0
    if args.action == "rm":
        for file_id in args.file_ids:
            srv.openai.files.delete(file_id)
            print(f"deleted {file_id}")
        return 0
    rows = [("ID", "FILENAME", "BYTES", "PURPOSE", "CREATED")]
    rows += [(f.id, f.filename, f.bytes, f.purpose, _when(f.created_at))
             for f in srv.openai.files.list(**({"purpose": args.purpose} if args.purpose else {}))]
    table(rows)
    return 0


@talks_to_server
def cmd_models(args: argparse.Namespace) -> int:
    """List the server's models (base, adapters, your fine-tuned models) or delete a
    fine-tuned one (and its checkpoint models)."""
    srv = Server(args)
    if args.action == "rm":
        if not args.model:
            raise ValueError("model: usage: shoal models rm MODEL")
        srv.openai.models.delete(args.model)
        print(f"deleted {args.model}")
        return 0
    rows = [("ID", "OWNED BY", "CREATED")]
    rows += [(m.id, m.owned_by, _when(m.created)) for m in srv.openai.models.list().data]
    table(rows)
    return 0


@talks_to_server
def cmd_usage(args: argparse.Namespace) -> int:
    """Your organization's tokens and cost by day and model over the last N days (UTC)."""
    if args.days < 1:
        raise ValueError("days: must be at least 1")
    srv = Server(args)
    today = dt.datetime.now(dt.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    start = int((today - dt.timedelta(days=args.days - 1)).timestamp())
    r = srv.get("/usage", by="day", start_time=start)
    keys = ("num_requests", "prompt_tokens", "completion_tokens", "total_tokens")
    total = {k: sum(row.get(k, 0) for row in r["data"]) for k in keys}
    rows = [("DAY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL", "COST USD")]
    rows += [(row["day"], row["model"], *(row.get(k, 0) for k in keys),
              f"{row.get('cost_usd', 0.0):.6f}") for row in r["data"]]
    rows.append(("total", "", *(total[k] for k in keys), f"{r.get('total_cost_usd', 0.0):.6f}"))
    table(rows)
    return 0


@talks_to_server
def cmd_tokenize(args: argparse.Namespace) -> int:
    """Count TEXT's tokens for a model and show each (id and text); --chat wraps it as a user
    message in the model's chat template."""
    srv = Server(args)
    model = args.model or srv.default_model()
    body = ({"model": model, "messages": [{"role": "user", "content": args.text}]} if args.chat
            else {"model": model, "prompt": args.text})
    r = srv.post("/tokenize", body)
    print(f"{r['count']} tokens ({model}, context {r.get('max_model_len', '?')})")
    table([("#", "ID", "TOKEN")] + [(i, t, repr(s)) for i, (t, s)
                                    in enumerate(zip(r["tokens"], r["token_strs"]))])
    return 0


# --- arguments ---------------------------------------------------------------------------------

def add_complete_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text (`-` reads stdin)")
    p.add_argument("--model", default=None, help="model id (default: the server's base model)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default %(default)s)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--n", type=int, default=None, help="completions to generate")
    p.add_argument("--stop", nargs="+", action="extend", metavar="S",
                   help="stop sequences (up to 4; `\\n` is a newline)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="show each token's logprob and the top K (0-5) on stderr")
    p.add_argument("--json", action="store_true",
                   help="JSON mode: the answer is one JSON object (the prompt must ask for JSON)")
    p.add_argument("--schema", default=None, metavar="FILE",
                   help="Structured Outputs: each answer is one instance of the JSON Schema in FILE")
    add_connection_args(p)


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model id (default: the server's base model)")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per answer (default: the rest of the context)")
    p.add_argument("--json", action="store_true",
                   help="JSON mode: each answer is one JSON object (a message must ask for JSON)")
    p.add_argument("--schema", default=None, metavar="FILE",
                   help="Structured Outputs: each answer is one instance of the JSON Schema in FILE")
    add_connection_args(p)


def add_files_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{upload,list,rm}")
    up = sub.add_parser("upload", help="upload a file (prints its id)")
    up.add_argument("path", help="the file")
    up.add_argument("--purpose", default="fine-tune", help="file purpose (default %(default)s)")
    ls = sub.add_parser("list", help="list your files")
    ls.add_argument("--purpose", default=None, help="only files with this purpose")
    rm = sub.add_parser("rm", help="delete files")
    rm.add_argument("file_ids", nargs="+", metavar="ID", help="file id(s)")
    for q in (up, ls, rm):
        add_connection_args(q)


def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=["list", "rm"])
    p.add_argument("model", nargs="?", help="model id (rm)")
    add_connection_args(p)


def add_usage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--days", type=int, default=7, help="days back, today included (default %(default)s)")
    add_connection_args(p)


def add_tokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text")
    p.add_argument("--model", default=None, help="model id (default: the server's base model)")
    p.add_argument("--chat", action="store_true", help="as a user message in the chat template")
    add_connection_args(p)
