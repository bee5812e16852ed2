"""`shoal finetune` (create, list, follow, cancel) and `shoal curve` against a running server.

Following a job polls the job and its events: new events print as lines, the newest training
step drives a progress bar on stderr (in place on a terminal, one line per ~10% otherwise), and
the final status and model name go to stdout. Exit 0 when the job succeeded, 1 when it failed
or was cancelled. Not here: the training itself (a server's workers do it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from .admin import _when, table
from .remote import Server, add_connection_args, talks_to_server

POLL_S = 0.5
TERMINAL = ("succeeded", "failed", "cancelled")
STEP = re.compile(r"^Step (\d+)/(\d+)")
CURVES = "/fine_tuning/learning_curves"


class Progress:
    """A text progress bar on stderr: redrawn in place on a terminal, else a line per ~10%."""

    def __init__(self, out=None, width: int = 20) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.width, self.tenth, self.shown = width, -1, False

    def bar(self, frac: float) -> str:
        n = int(round(max(0.0, min(frac, 1.0)) * self.width))
        return "[" + "#" * n + "." * (self.width - n) + "]"

    def update(self, frac: float, text: str) -> None:
        line = f"{self.bar(frac)} {text}"
        if self.tty:
            self.out.write("\r\033[K" + line)
            self.shown = True
        elif int(frac * 10) > self.tenth:
            self.tenth = int(frac * 10)
            self.out.write(line + "\n")
        self.out.flush()

    def message(self, text: str) -> None:
        """A line above the bar."""
        self.out.write(("\r\033[K" if self.shown else "") + text + "\n")
        self.shown = False
        self.out.flush()

    def close(self) -> None:
        if self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = False


def _clock(s: float) -> str:
    s = max(int(s), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def step_text(job, step: int, total: int, loss: float | None, rate: float | None) -> str:
    """`epoch 2/3 step 40/60 loss 0.123 ETA 0:12` for a job at `step` of `total`."""
    epochs = getattr(job.hyperparameters, "n_epochs", None)
    parts = []
    if isinstance(epochs, int) and epochs > 0 and total % epochs == 0:
        per = total // epochs
        parts.append(f"epoch {min((max(step, 1) - 1) // per + 1, epochs)}/{epochs}")
    parts.append(f"step {step}/{total}")
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    left = (job.estimated_finish - time.time() if job.estimated_finish
            else (total - step) / rate if rate else None)
    if left is not None and step < total:
        parts.append(f"ETA {_clock(left)}")
    return " ".join(parts)


def new_events(srv: Server, job_id: str, seen: set[str]) -> list:
    """The job's events not in `seen` (added to it), oldest first; pages back until a seen one."""
    fresh, after = [], None
    while True:
        page = srv.openai.fine_tuning.jobs.list_events(job_id, limit=100,
                                                       **({"after": after} if after else {}))
        new = [e for e in page.data if e.id not in seen]
        fresh += new
        if len(new) < len(page.data) or not page.has_more or not page.data:
            break
        after = page.data[-1].id
    seen.update(e.id for e in fresh)
    return fresh[::-1]


def follow(srv: Server, job_id: str, progress: Progress | None = None):
    """Show a job's events and progress until it ends; returns the final job."""
    progress = progress or Progress()
    seen: set[str] = set()
    t0, step0 = time.time(), None
    try:
        while True:
            job = srv.openai.fine_tuning.jobs.retrieve(job_id)
            last = None
            for ev in new_events(srv, job_id, seen):
                if ev.type == "metrics":
                    last = ev
                elif ev.level != "error":  # the job's error is printed once, at the end
                    progress.message(f"{_when(ev.created_at)}  {ev.message}")
            m = STEP.match(last.message) if last else None
            if m:
                step, total = int(m[1]), int(m[2])
                step0 = step if step0 is None else step0
                rate = (step - step0) / (time.time() - t0) if step > step0 else None
                progress.update(step / total, step_text(job, step, total,
                                                        (last.data or {}).get("train_loss"), rate))
            if job.status in TERMINAL:
                return job
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        progress.message(f"stopped following; the job goes on: shoal finetune follow {job_id}")
        raise
    finally:
        progress.close()


def report(job) -> int:
    """Print the job's final status (stdout) and error (stderr); the exit code."""
    print(f"status: {job.status}")
    if job.status == "succeeded":
        print(f"model: {job.fine_tuned_model}")
        return 0
    if job.error and job.error.message:
        param = f" (param {job.error.param})" if job.error.param and not \
            job.error.message.startswith(f"{job.error.param}:") else ""
        print(f"shoal: error: {' '.join(job.error.message.split())}{param}", file=sys.stderr)
    else:
        print(f"shoal: error: job {job.id} {job.status}", file=sys.stderr)
    return 1


def upload_or_id(srv: Server, ref: str, param: str) -> str:
    """A local path is uploaded (purpose fine-tune); anything else must be a file id."""
    if os.path.isfile(ref):
        with open(ref, "rb") as f:
            row = srv.openai.files.create(file=(os.path.basename(ref), f), purpose="fine-tune")
        print(f"uploaded {ref} as {row.id} ({row.bytes} bytes)", file=sys.stderr)
        return row.id
    if ref.startswith("file-"):
        return ref
    raise ValueError(f"{param}: {ref} is neither a local file nor a file id (file-...)")


@talks_to_server
def cmd_finetune(args: argparse.Namespace) -> int:
    """Create, list, follow or cancel fine-tuning jobs on the server."""
    srv = Server(args)
    jobs = srv.openai.fine_tuning.jobs
    if args.action == "create":
        hp = {"n_epochs": args.epochs, "batch_size": args.batch_size,
              "learning_rate_multiplier": args.lr_multiplier}
        hp = {k: v for k, v in hp.items() if v is not None}
        train = upload_or_id(srv, args.file, "training_file")
        valid = upload_or_id(srv, args.validation_file, "validation_file") if args.validation_file else None
        kw = dict(validation_file=valid, seed=args.seed, suffix=args.suffix,
                  hyperparameters=hp or None)
        job = jobs.create(model=args.model, training_file=train,
                          **{k: v for k, v in kw.items() if v is not None})
        print(job.id)
        print(f"created {job.id} ({job.status}) on {job.model}; follow it: shoal finetune follow "
              f"{job.id}", file=sys.stderr)
        return report(follow(srv, job.id)) if args.follow else 0
    if args.action == "follow":
        return report(follow(srv, args.job_id))
    if args.action == "cancel":
        job = jobs.cancel(args.job_id)
        print(f"{job.id}: cancel requested ({job.status})")
        return 0
    rows = [("ID", "MODEL", "STATUS", "FINE-TUNED MODEL", "CREATED", "TRAINED TOKENS")]
    rows += [(j.id, j.model, j.status, j.fine_tuned_model, _when(j.created_at), j.trained_tokens)
             for j in jobs.list(limit=args.limit).data]
    table(rows)
    return 0


def _fmt(v, spec: str = ".4f") -> str:
    return "" if v is None else format(v, spec)


@talks_to_server
def cmd_curve(args: argparse.Namespace) -> int:
    """Fine-tune on nested subsets of DATA (doubling sizes), measure each point's error on a
    hold-out, fit the curve and predict how many examples reach --target-error; writes the plot."""
    srv = Server(args)
    sizes = None
    if args.sizes:
        try:
            sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"sizes: expected integers like 10,20,40, got {args.sizes!r}") from None
    train = upload_or_id(srv, args.data, "training_file")
    body = {"model": args.model, "training_file": train, "sizes": sizes, "metric": args.metric,
            "seed": args.seed, "target_error": args.target_error,
            "hyperparameters": {"n_epochs": args.epochs} if args.epochs else None}
    curve = srv.post(CURVES, {k: v for k, v in body.items() if v is not None})
    print(f"learning curve {curve['id']}: {len(curve['jobs'])} point jobs, sizes "
          f"{','.join(map(str, curve['sizes']))}", file=sys.stderr)
    curve = follow_curve(srv, curve)
    pts = curve.get("points") or []
    table([("N", "ERROR", "VALID_LOSS", "STATUS", "MODEL")] + [
        (p["n_examples"], _fmt(p.get("error")), _fmt(p.get("valid_loss")), p.get("status"),
         p.get("model")) for p in pts])
    if curve["status"] != "succeeded":
        err = (curve.get("error") or {}).get("message") or f"learning curve {curve['status']}"
        print(f"shoal: error: {' '.join(err.split())}", file=sys.stderr)
        return 1
    fit, pred = curve.get("fit"), curve.get("prediction")
    print(f"fit: {fit['formula']}" if fit else "fit: none (fewer than 2 measured points)")
    if pred:
        print(f"prediction: {pred['message']}")
    out = args.out or f"learning_curve_{curve['id']}.svg"
    svg = srv.request("GET", f"{CURVES}/{curve['id']}/plot").content
    with open(out, "wb") as f:
        f.write(svg)
    print(f"plot: {out}")
    return 0


def follow_curve(srv: Server, curve: dict) -> dict:
    """Poll a curve until it ends, printing each point job's status changes."""
    shown: dict[str, str] = {}
    n_pts, evaluating = len(curve["jobs"]), False
    try:
        while curve["status"] == "running":
            time.sleep(POLL_S)
            curve = srv.get(f"{CURVES}/{curve['id']}")
            pts = curve.get("points") or []
            for i, p in enumerate(pts, 1):
                if shown.get(p["job_id"]) != p["status"]:
                    shown[p["job_id"]] = p["status"]
                    done = sum(q["status"] in TERMINAL for q in pts)
                    print(f"point {i}/{n_pts} (n={p['n_examples']}, {p['job_id']}): {p['status']} "
                          f"[{done}/{n_pts} done]", file=sys.stderr)
            if (curve["status"] == "running" and len(pts) == n_pts and not evaluating
                    and all(p["status"] == "succeeded" for p in pts)):
                evaluating = True
                print("all points trained; evaluating on the hold-out and fitting", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"stopped following; the curve goes on: {curve['id']}", file=sys.stderr)
        raise
    return curve


def add_finetune_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="{create,list,follow,cancel}")
    c = sub.add_parser("create", help="create a job (a local file is uploaded first)")
    c.add_argument("file", metavar="FILE_OR_ID", help="training JSONL path or file id")
    c.add_argument("--model", required=True, help="the base model to fine-tune")
    c.add_argument("--validation-file", default=None, help="validation JSONL path or file id")
    c.add_argument("--epochs", type=int, default=None, help="n_epochs (default auto)")
    c.add_argument("--batch-size", type=int, default=None, help="batch_size (default auto)")
    c.add_argument("--lr-multiplier", type=float, default=None,
                   help="learning_rate_multiplier (default auto)")
    c.add_argument("--seed", type=int, default=None, help="seed (default random)")
    c.add_argument("--suffix", default=None, help="added to the fine-tuned model's name")
    c.add_argument("--follow", action="store_true", help="show progress until the job ends")
    ls = sub.add_parser("list", help="list your jobs, newest first")
    ls.add_argument("--limit", type=int, default=20, help="jobs to show (default %(default)s)")
    f = sub.add_parser("follow", help="show a job's progress until it ends")
    f.add_argument("job_id", help="the job id (ftjob-...)")
    x = sub.add_parser("cancel", help="cancel a job")
    x.add_argument("job_id", help="the job id (ftjob-...)")
    for q in (c, ls, f, x):
        add_connection_args(q)


def add_curve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="training JSONL path or file id")
    p.add_argument("--model", required=True, help="the base model")
    p.add_argument("--target-error", type=float, default=None,
                   help="predict the examples needed for this error (0-1)")
    p.add_argument("--sizes", default=None, help="comma-separated subset sizes (default: doubling)")
    p.add_argument("--metric", default="exact_match",
                   help="exact_match, token_error or valid_loss (default %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="n_epochs of every point (default auto)")
    p.add_argument("--seed", type=int, default=None, help="seed of the subsets and the training")
    p.add_argument("--out", default=None, help="SVG path (default learning_curve_<id>.svg)")
    add_connection_args(p)
