"""A live Shoal server on a free loopback port, serving a tiny random Llama as `tiny`, and the
official `openai` client pointed at it."""

from __future__ import annotations

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
from tests.helpers import hf_tiny_config, save_tiny_hf_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_tokenizer_dir):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api_model")
    save_tiny_hf_dir(hf_tiny_config("llama", max_position_embeddings=512), path, tiny_tokenizer_dir)
    engine = AsyncEngine(EngineConfig(model="tiny", block_size=8, num_kv_blocks=1024,
                                      max_num_batched_tokens=256),
                         loaded=load_dir(str(path), dtype="float32"))
    app = create_app(engine, "tiny")
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=5)
    engine.shutdown()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="test-key", max_retries=0)
