"""`shoal adapters export|import`: take a fine-tuned model's PEFT adapter out of Shoal, or bring
one trained elsewhere in as a fine-tuned model of an organization.

Both work on the store and `$SHOAL_HOME` directly, like `keys`; a running server serves an
imported model on its first request (it reads the store then). Only the PEFT files move
(`adapter_config.json` and the weights), each copy written atomically (temporary directory +
rename). Not here: converting other adapter formats, or merging adapters into a base model.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile

from .admin import _db, _store

SUFFIX = re.compile(r"^[A-Za-z0-9._-]{0,64}$")  # as the fine-tuning API's `suffix`


def adapter_files(src: str) -> list[str]:
    """The PEFT files of adapter directory `src`: its config and the weights file Shoal loads."""
    from ..lora.peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

    weights = SAFETENSORS_NAME if os.path.isfile(os.path.join(src, SAFETENSORS_NAME)) else BIN_NAME
    return [CONFIG_NAME, weights]


def copy_adapter(src: str, dest: str) -> None:
    """Copy the adapter in `src` to `dest` (missing or an empty directory), atomically."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    try:
        for name in adapter_files(src):
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        if os.path.isdir(dest):
            os.rmdir(dest)  # empty (checked by the caller); fails loudly if it filled meanwhile
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def cmd_adapters(args: argparse.Namespace) -> int:
    """Export a fine-tuned model's LoRA adapter as a PEFT directory, or import a PEFT LoRA
    adapter as a fine-tuned model of an organization."""
    if args.action == "export":
        return export_adapter(args)
    return import_adapter(args)


def export_adapter(args: argparse.Namespace) -> int:
    row = _store(args).get_model(args.model)
    if row is None:
        raise ValueError(f"model: no fine-tuned model named {args.model!r}")
    if not os.path.isdir(row.path):
        raise ValueError(f"model: the adapter files of {args.model} are missing ({row.path})")
    dest = args.dir
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise ValueError(f"dir: {dest} exists and is not an empty directory")
    copy_adapter(row.path, dest)
    print(f"exported {args.model} (base {row.base_model}) to {dest}", file=sys.stderr)
    return 0


def _check_fits_base(cfg, base: str) -> None:
    """Refuse an adapter whose modules or shapes do not fit `base`; warn when `base` cannot be
    loaded here (its shapes are then checked by the server on first use)."""
    from ..config import EngineConfig
    from ..lora.peft_format import AdapterError, validate_adapter
    from ..model.registry import ModelRegistry

    try:
        loaded = ModelRegistry().load(base, dtype="float32")
    except (ValueError, OSError) as e:
        print(f"shoal: warning: base: cannot load {base} here ({e}); the adapter's shapes are "
              f"not checked", file=sys.stderr)
        return
    try:
        validate_adapter(cfg, loaded.model, max_lora_rank=cfg.max_rank)
    except AdapterError as e:
        raise ValueError(f"dir: the adapter does not fit {base}: {e}") from None
    default_rank = EngineConfig().max_lora_rank
    if cfg.max_rank > default_rank:
        print(f"shoal: warning: r: rank {cfg.max_rank} exceeds the default max_lora_rank "
              f"{default_rank}; serve with --max-lora-rank {cfg.max_rank}", file=sys.stderr)


def import_adapter(args: argparse.Namespace) -> int:
    from ..finetune.jobs import fine_tuned_name
    from ..lora.peft_format import AdapterError, read_adapter_config
    from ..paths import shoal_home
    from ..store.ids import new_id

    if not args.org:
        raise ValueError("org: give the organization: shoal adapters import DIR --org NAME "
                         "--base BASE")
    if not args.base:
        raise ValueError("base: give the base model as `shoal serve --model` names it")
    if args.name and not SUFFIX.match(args.name):
        raise ValueError("name: letters, digits, '.', '_' and '-' only (up to 64)")
    try:
        cfg = read_adapter_config(args.dir)
    except AdapterError as e:
        raise ValueError(f"dir: not a LoRA adapter Shoal can serve: {e}") from None
    _check_fits_base(cfg, args.base)
    store = _store(args)
    org = store.get_or_create_org(args.org)
    adapter_id = new_id("adapter-")
    name = fine_tuned_name(args.base, org.name, args.name, adapter_id)
    path = str(shoal_home() / "adapters" / adapter_id)
    copy_adapter(args.dir, path)
    try:
        store.add_model(name, org.id, args.base, path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    print(name)
    print(f"imported {args.dir} for org {org.name} on {args.base} (rank {cfg.max_rank}) "
          f"into {path}", file=sys.stderr)
    return 0


def add_adapters_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    e = sub.add_parser("export", help="copy a fine-tuned model's adapter to a PEFT directory")
    e.add_argument("model", help="the fine-tuned model (ft:...), a checkpoint model included")
    e.add_argument("dir", help="destination directory (must not exist, or be empty)")
    _db(e)
    i = sub.add_parser("import", help="register a PEFT LoRA adapter as a fine-tuned model")
    i.add_argument("dir", help="a PEFT adapter directory (adapter_config.json + weights)")
    i.add_argument("--org", help="organization that owns the model (created if new)")
    i.add_argument("--base", help="base model, spelled as `shoal serve --model` names it")
    i.add_argument("--name", help="suffix for the model name ft:BASE:ORG:SUFFIX:ID")
    _db(i)
