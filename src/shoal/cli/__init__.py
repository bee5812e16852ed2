"""The `shoal` command: a table of subcommands, each a small function in a module by area.

Local (no server): `serve`, `worker`, `generate`, `models`, `keys`, `prices`, `adapters`.
Errors print one line to stderr and exit non-zero; tracebacks only with SHOAL_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import adapters, admin, local, serve

# name -> (function, help, argument builder)
COMMANDS = {
    "serve": (serve.cmd_serve, "serve the OpenAI-compatible API", serve.add_serve_args),
    "worker": (serve.cmd_worker, "run a fine-tuning worker", serve.add_worker_args),
    "generate": (local.cmd_generate, "stream a completion from a model", local.add_generate_args),
    "models": (local.cmd_models, "list, add or remove base models", local.add_models_args),
    "keys": (admin.cmd_keys, "create, list or revoke API keys", admin.add_keys_args),
    "prices": (admin.cmd_prices, "set or list per-model prices", admin.add_prices_args),
    "adapters": (adapters.cmd_adapters, "export or import LoRA adapters (PEFT format)",
                 adapters.add_adapters_args),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="Self-hosted GPT-style models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=fn.__doc__)
        add_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # our errors are ValueErrors that name the field or file
        if os.environ.get("SHOAL_DEBUG"):
            raise
        print(f"shoal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
