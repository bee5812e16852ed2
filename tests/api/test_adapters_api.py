"""Adapters through the API: listed by /v1/models, usable as `model`, and they change the output;
an unknown adapter name is a 404."""

from __future__ import annotations

import asyncio

import httpx
import torch
import transformers

from shoal.api.app import create_app
from shoal.config import EngineConfig
from shoal.engine.async_engine import AsyncEngine
from shoal.model.loader import load_dir
from shoal.settings import ServerSettings
from shoal.store import Store
from tests.helpers import hf_tiny_config, save_tiny_hf_dir
from tests.lora import make_peft_adapter


def test_adapter_served_as_a_model(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("llama", max_position_embeddings=512), tmp_path / "base",
                     tiny_tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    make_peft_adapter(hf, tmp_path / "ad", seed=1, b_std=0.5, r=8, lora_alpha=16,
                      target_modules=["q_proj", "v_proj", "down_proj"])
    engine = AsyncEngine(EngineConfig(model="base", block_size=8, num_kv_blocks=256, enable_lora=True,
                                      max_loras=2, max_lora_rank=8),
                         loaded=load_dir(str(tmp_path / "base"), dtype="float32"))
    engine.engine.lora.add_adapter("ft:base:org:reviews:abc123", str(tmp_path / "ad"))
    store = Store.open(f"sqlite:///{tmp_path}/shoal.db")  # no keys: open mode on loopback
    app = create_app(engine, "base", store, ServerSettings.from_env(home=tmp_path))

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            models = (await c.get("/v1/models")).json()
            body = {"prompt": [5, 6, 7, 8, 9], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            base = (await c.post("/v1/completions", json={**body, "model": "base"})).json()
            tuned = (await c.post("/v1/completions",
                                  json={**body, "model": "ft:base:org:reviews:abc123"})).json()
            one = (await c.get("/v1/models/ft:base:org:reviews:abc123")).json()
            missing = await c.post("/v1/completions", json={**body, "model": "ft:base:org:x:zzz"})
            return models, base, tuned, one, missing

    try:
        models, base, tuned, one, missing = asyncio.run(main())
    finally:
        engine.shutdown()
    assert [m["id"] for m in models["data"]] == ["base", "ft:base:org:reviews:abc123"]
    assert one["id"] == "ft:base:org:reviews:abc123" and one["owned_by"] == "system"
    assert tuned["model"] == "ft:base:org:reviews:abc123"
    assert tuned["choices"][0]["text"] != base["choices"][0]["text"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
