"""`shoal adapters import|export`: a real PEFT adapter registered for an org on a tiny llama,
copied byte for byte both ways, and the refusals (not an adapter, wrong shapes, unknown model,
non-empty destination) as one-line errors that leave nothing behind."""

from __future__ import annotations

import os
import re

import pytest
import torch

from shoal.cli import main
from shoal.lora.peft_format import load_adapter, validate_adapter
from shoal.model.registry import ModelRegistry
from shoal.store import Store
from tests.helpers import hf_tiny_config, save_tiny_hf_dir
from tests.lora import make_peft_adapter

PEFT_FILES = ["adapter_config.json", "adapter_model.safetensors"]
QV = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory, tiny_tokenizer_dir):
    """(tiny llama dir, PEFT adapter dir made for it)."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    hf = save_tiny_hf_dir(hf_tiny_config("llama"), root / "base", tiny_tokenizer_dir)
    make_peft_adapter(hf, root / "qv", seed=1, **QV)
    return str(root / "base"), str(root / "qv")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """(SHOAL_HOME, database URL), both fresh."""
    home = tmp_path / "home"
    monkeypatch.setenv("SHOAL_HOME", str(home))
    monkeypatch.delenv("SHOAL_DATABASE_URL", raising=False)
    return home, f"sqlite:///{tmp_path}/shoal.db"


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shoal: error:"), err
    return err[0]


def same_bytes(a, b, names=PEFT_FILES) -> bool:
    return all(open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read()
               for n in names)


def import_(adapter: str, base: str, db: str, *extra: str) -> list[str]:
    return ["adapters", "import", adapter, "--org", "acme", "--base", base, "--database-url", db,
            *extra]


def test_import_registers_the_adapter_for_the_org(env, base_and_adapter, capsys):
    home, db = env
    base, adapter = base_and_adapter
    assert main(import_(adapter, base, db, "--name", "sql")) == 0
    name = capsys.readouterr().out.strip()
    assert re.fullmatch(rf"ft:{re.escape(base)}:acme:sql:[0-9a-f]{{8}}", name), name

    store = Store.open(db)
    org = store.get_or_create_org("acme")
    row = store.get_model(name)
    # what the server checks before serving it: the caller's org and the served base name
    assert row.org_id == org.id and row.base_model == base and row.job_id is None
    assert [m.name for m in store.list_models(org.id)] == [name]
    assert os.path.dirname(row.path) == str(home / "adapters")
    assert sorted(os.listdir(row.path)) == PEFT_FILES and same_bytes(adapter, row.path)
    assert not [n for n in os.listdir(home / "adapters") if n.startswith(".")]  # no temporaries
    ad = load_adapter(row.path)
    validate_adapter(ad, ModelRegistry().load(base, dtype="float32").model, max_lora_rank=64)


def test_each_import_is_a_new_model(env, base_and_adapter, capsys):
    _, db = env
    base, adapter = base_and_adapter
    names = []
    for _ in range(2):
        assert main(import_(adapter, base, db)) == 0
        names.append(capsys.readouterr().out.strip())
    assert names[0] != names[1] and all(n.startswith(f"ft:{base}:acme::") for n in names)


def test_export_copies_the_adapter_bytes(env, base_and_adapter, tmp_path, capsys):
    _, db = env
    base, adapter = base_and_adapter
    assert main(import_(adapter, base, db)) == 0
    name = capsys.readouterr().out.strip()
    out = tmp_path / "exported" / "qv"
    assert main(["adapters", "export", name, str(out), "--database-url", db]) == 0
    assert sorted(os.listdir(out)) == PEFT_FILES and same_bytes(adapter, out)
    assert os.listdir(out.parent) == ["qv"]  # the temporary directory was renamed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["adapters", "export", name, str(empty), "--database-url", db]) == 0
    assert same_bytes(adapter, empty)


def test_export_refuses_a_non_empty_dir(env, base_and_adapter, tmp_path, capsys):
    _, db = env
    base, adapter = base_and_adapter
    assert main(import_(adapter, base, db)) == 0
    name = capsys.readouterr().out.strip()
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert main(["adapters", "export", name, str(full), "--database-url", db]) == 2
    assert "dir" in one_line_error(capsys)
    assert os.listdir(full) == ["notes.txt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_export_of_an_unknown_model(env, tmp_path, capsys):
    _, db = env
    assert main(["adapters", "export", "ft:nope:acme::12345678", str(tmp_path / "o"),
                 "--database-url", db]) == 2
    err = one_line_error(capsys)
    assert "model" in err and "ft:nope:acme::12345678" in err
    assert not (tmp_path / "o").exists()


def test_import_refuses_a_dir_that_is_not_an_adapter(env, base_and_adapter, tmp_path, capsys):
    home, db = env
    base, _ = base_and_adapter
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"not an adapter")
    assert main(import_(str(junk), base, db)) == 2
    err = one_line_error(capsys)
    assert "dir" in err and "adapter_config.json" in err
    assert Store.open(db).list_models() == [] and not (home / "adapters").exists()


def test_import_refuses_an_adapter_for_another_hidden_size(env, base_and_adapter, tmp_path, capsys):
    home, db = env
    base, _ = base_and_adapter
    torch.manual_seed(0)
    wide = save_tiny_hf_dir(hf_tiny_config("llama", hidden_size=128), tmp_path / "wide")
    make_peft_adapter(wide, tmp_path / "wide_qv", seed=2, **QV)
    capsys.readouterr()  # transformers' progress bars
    assert main(import_(str(tmp_path / "wide_qv"), base, db)) == 2
    err = one_line_error(capsys)
    assert "dir" in err and "lora_A" in err and "64" in err
    assert Store.open(db).list_models() == [] and not (home / "adapters").exists()


def test_import_refuses_a_bad_suffix_and_a_missing_org(env, base_and_adapter, capsys):
    _, db = env
    base, adapter = base_and_adapter
    assert main(import_(adapter, base, db, "--name", "a:b")) == 2
    assert "name" in one_line_error(capsys)
    assert main(["adapters", "import", adapter, "--base", base, "--database-url", db]) == 2
    assert "org" in one_line_error(capsys)
    assert Store.open(db).list_models() == []


def test_import_on_a_base_not_loadable_here_warns(env, base_and_adapter, capsys):
    _, db = env
    _, adapter = base_and_adapter
    assert main(import_(adapter, "some-remote-base", db)) == 0
    out, err = capsys.readouterr()
    assert out.strip().startswith("ft:some-remote-base:acme::")
    assert "warning: base" in err and "not checked" in err
