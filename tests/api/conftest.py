"""A live Shoal server on a free loopback port, serving a tiny random Llama as `tiny` with a
SQLite store holding API keys for three orgs, and the official `openai` client pointed at it
with the first org's key. `server` is (url, engine, store, keys: org name -> plaintext key)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch
import uvicorn

from shoal.api.app import create_app
from shoal.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.model.loader import load_dir
from shoal.settings import ServerSettings
from shoal.store import Store
from tests.helpers import hf_tiny_config, save_tiny_hf_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app, port: int):
    """Serve `app` on 127.0.0.1:port from a thread for the duration of the block."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield
    finally:
        srv.should_exit = True
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_tokenizer_dir):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api_model")
    save_tiny_hf_dir(hf_tiny_config("llama", max_position_embeddings=512), path, tiny_tokenizer_dir)
    engine = AsyncEngine(EngineConfig(model="tiny", block_size=8, num_kv_blocks=1024,
                                      max_num_batched_tokens=256, enable_lora=True, max_loras=4,
                                      max_lora_rank=8),
                         loaded=load_dir(str(path), dtype="float32"))
    home = tmp_path_factory.mktemp("api_home")
    store = Store.open(f"sqlite:///{home}/shoal.db")
    keys = {org: store.create_key(org, admin=(org == "acme"))[0] for org in ("acme", "beta", "gamma")}
    port = free_port()
    settings = ServerSettings.from_env(home=home, port=port)
    app = create_app(engine, "tiny", store, settings)
    with live(app, port):
        yield f"http://127.0.0.1:{port}", engine, store, keys
    engine.shutdown()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key=server[3]["acme"], max_retries=0)


@pytest.fixture
def auth(server):
    """Headers with the first org's key, for plain httpx calls."""
    return {"authorization": f"Bearer {server[3]['acme']}"}
