"""A live server with the playground router on a learnable tiny model (as `tests/api`'s `ft`
fixture: keys for two orgs, an in-process fine-tuning worker), and headless Debian Chromium
driven by Playwright. `scripts/test.sh` installs Chromium (Debian's package) when it is missing;
without it these tests fail with the install command, they do not skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shoal.api.app import create_app
from shoal.settings import ServerSettings
from shoal.store import Store
from tests.api.conftest import free_port, live
from tests.api.test_fine_tuning import learnable_server

CHROMIUM = os.environ.get("SHOAL_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def pg(tmp_path_factory, tiny_tokenizer_dir):
    """{url, store, keys, engine, ...}: the API and the playground on one port."""
    with learnable_server(tmp_path_factory.mktemp("playground"), tiny_tokenizer_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def open_pg(pg, tmp_path_factory):
    """The same engine behind a second app whose store has no keys: open mode (any key works)."""
    root = tmp_path_factory.mktemp("playground_open")
    store = Store.open(f"sqlite:///{root}/shoal.db")
    port = free_port()
    settings = ServerSettings.from_env(home=root / "home", port=port)
    app = create_app(pg["engine"], "tiny", store, settings)
    with live(app, port):
        yield {"url": f"http://127.0.0.1:{port}", "store": store}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $SHOAL_ARTIFACTS, else /tmp/shoal-artifacts."""
    out = Path(os.environ.get("SHOAL_ARTIFACTS") or "/tmp/shoal-artifacts") / "playground"
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nplayground screenshots: {out}")
    return out


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (scripts/test.sh does)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page (own localStorage) at laptop size; uncaught page errors fail the test."""
    ctx = browser.new_context(viewport={"width": 1366, "height": 900})
    pg_ = ctx.new_page()
    pg_.set_default_timeout(15_000)
    errors: list[str] = []
    pg_.on("pageerror", lambda e: errors.append(str(e)))
    yield pg_
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
