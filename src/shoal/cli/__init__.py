"""The `shoal` command: a table of subcommands, each a small function in a module by area.

Local (no server): `serve`, `worker`, `generate`, `base-models`, `keys`, `prices`, `adapters`.
Client (a running server, `--base-url`/`--api-key`): `complete`, `chat`, `files`, `finetune`,
`curve`, `models`, `usage`, `tokenize`, `bench`.
Errors print one line to stderr and exit non-zero; tracebacks only with SHOAL_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import adapters, admin, bench, client, finetune, local, serve

# name -> (function, help, argument builder)
COMMANDS = {
    "serve": (serve.cmd_serve, "serve the OpenAI-compatible API", serve.add_serve_args),
    "worker": (serve.cmd_worker, "run a fine-tuning worker", serve.add_worker_args),
    "generate": (local.cmd_generate, "stream a completion from a model", local.add_generate_args),
    "base-models": (local.cmd_base_models, "list, add or remove base models on this machine",
                    local.add_base_models_args),
    "keys": (admin.cmd_keys, "create, list or revoke API keys", admin.add_keys_args),
    "prices": (admin.cmd_prices, "set or list per-model prices", admin.add_prices_args),
    "adapters": (adapters.cmd_adapters, "export or import LoRA adapters (PEFT format)",
                 adapters.add_adapters_args),
    # client commands: talk to a running server
    "complete": (client.cmd_complete, "stream a completion from the server", client.add_complete_args),
    "chat": (client.cmd_chat, "chat with a model on the server", client.add_chat_args),
    "files": (client.cmd_files, "upload, list or delete files on the server", client.add_files_args),
    "finetune": (finetune.cmd_finetune, "create, list, follow or cancel fine-tuning jobs",
                 finetune.add_finetune_args),
    "curve": (finetune.cmd_curve, "measure a learning curve and predict the data needed",
              finetune.add_curve_args),
    "models": (client.cmd_models, "list or delete the server's models", client.add_models_args),
    "usage": (client.cmd_usage, "tokens and cost by day and model", client.add_usage_args),
    "tokenize": (client.cmd_tokenize, "count and show a text's tokens", client.add_tokenize_args),
    "bench": (bench.cmd_bench, "load-test the running server", bench.add_bench_args),
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
