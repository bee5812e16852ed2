"""Administration on the store directly (same database as the server): API keys and prices."""

from __future__ import annotations

import argparse
import datetime as dt
import sys


def _store(args):
    from ..store import Store

    return Store.open(args.database_url)


def table(rows: list[tuple], out=None) -> None:
    """Print rows (the first is the header) as aligned columns."""
    out = out or sys.stdout
    rows = [tuple("" if c is None else str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def _when(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M") if t else ""


def cmd_keys(args: argparse.Namespace) -> int:
    """Create an API key (printed once; only its hash is kept), list keys, or revoke one."""
    store = _store(args)
    if args.action == "create":
        if not args.org:
            raise ValueError("org: give the organization: shoal keys create --org NAME")
        key, row = store.create_key(args.org, name=args.name, admin=args.admin)
        print(key)
        print(f"created {row.id} for org {args.org}{' (admin)' if row.is_admin else ''}; "
              f"store it now: it is not shown again", file=sys.stderr)
        return 0
    if args.action == "revoke":
        if not args.key_id:
            raise ValueError("key_id: usage: shoal keys revoke KEY_ID")
        if not store.revoke_key(args.key_id):
            raise ValueError(f"key_id: no active key {args.key_id}")
        print(f"revoked {args.key_id}")
        return 0
    org_id = None
    if args.org:
        org_id = store.get_or_create_org(args.org).id
    orgs: dict[str, str] = {}
    rows = [("ID", "ORG", "NAME", "PREFIX", "ADMIN", "CREATED", "LAST USED", "REVOKED")]
    for k in store.list_keys(org_id):
        if k.org_id not in orgs:
            org = store.get_org(k.org_id)
            orgs[k.org_id] = org.name if org else k.org_id
        rows.append((k.id, orgs[k.org_id], k.name, k.prefix + "...", "yes" if k.is_admin else "",
                     _when(k.created_at), _when(k.last_used_at), _when(k.revoked_at)))
    table(rows)
    return 0


def cmd_prices(args: argparse.Namespace) -> int:
    """Set a model's price (USD per 1M tokens) or list the price table."""
    store = _store(args)
    if args.action == "set":
        if not args.model or args.prompt is None or args.completion is None:
            raise ValueError("model: usage: shoal prices set MODEL --prompt USD --completion USD "
                             "[--training USD]")
        for name in ("prompt", "completion", "training"):
            if getattr(args, name) is not None and getattr(args, name) < 0:
                raise ValueError(f"{name}: a price cannot be negative")
        store.set_price(args.model, args.prompt, args.completion, args.training or 0.0)
        print(f"{args.model}: ${args.prompt}/1M prompt, ${args.completion}/1M completion, "
              f"${args.training or 0.0}/1M training tokens")
        return 0
    rows = [("MODEL", "PROMPT/1M", "COMPLETION/1M", "TRAINING/1M")]
    rows += [(p.model, p.prompt_per_1m, p.completion_per_1m, p.training_per_1m)
             for p in store.list_prices()]
    table(rows)
    return 0


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default=None,
                   help="SQLAlchemy URL (default $SHOAL_DATABASE_URL or SQLite in $SHOAL_HOME)")


def add_keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=["create", "list", "revoke"])
    p.add_argument("key_id", nargs="?", help="key id (revoke)")
    p.add_argument("--org", help="organization name (created if new)")
    p.add_argument("--name", help="a label for the key")
    p.add_argument("--admin", action="store_true", help="may also read the org's usage API (/v1/organization/usage/completions)")
    _db(p)


def add_prices_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", default="list", choices=["set", "list"])
    p.add_argument("model", nargs="?", help="model name (set); fine-tuned models default to their base")
    p.add_argument("--prompt", type=float, help="USD per 1M prompt tokens")
    p.add_argument("--completion", type=float, help="USD per 1M completion tokens")
    p.add_argument("--training", type=float, help="USD per 1M training tokens")
    _db(p)
