"""kv_cache_dtype="int8": a bf16 model's keys and values stored as int8 with a scale per token and
kv head, read by the CPU kernels (head sizes 64 and 128). ~1.9x the blocks in the same budget, outputs close to a bf16
cache, rows still independent of the batch and of the chunking, and a clear refusal where the
kernels cannot serve it."""

from __future__ import annotations

import pytest
import torch

from shoal import kernels
from shoal.engine.paged_attention import PagedKVCache
from shoal.engine.sampling_params import SamplingParams
from shoal.model.loader import load_dir
from tests.engine.test_kv_cache_dtype import assert_outputs_close
from tests.engine.test_llm_engine import GREEDY, make_llm, prompts
from tests.helpers import hf_tiny_config, save_tiny_hf_dir


@pytest.fixture(scope="module", params=[64, 128])
def tiny_llama64(request, tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random Llama with head size 64 or 128 (2 query heads on 1 kv head), loaded in bf16."""
    if kernels.library() is None or not kernels.library().shoal_prefill_attention_isa():
        pytest.skip("the int8 KV cache needs the CPU kernels on AVX-512")
    torch.manual_seed(0)
    d = request.param
    path = tmp_path_factory.mktemp(f"engine_llama{d}")
    cfg = hf_tiny_config("llama", hidden_size=2 * d, num_attention_heads=2, num_key_value_heads=1, head_dim=d,
                         max_position_embeddings=512)
    save_tiny_hf_dir(cfg, path, tiny_tokenizer_dir)
    return load_dir(str(path), dtype="bfloat16")


def test_int8_cache_holds_more_blocks_and_its_scales(tiny_llama64):
    budget = dict(num_kv_blocks=None, kv_cache_memory=2**20)
    ref = make_llm(tiny_llama64, **budget).engine.runner.cache
    c = make_llm(tiny_llama64, kv_cache_dtype="int8", **budget).engine.runner.cache
    assert ref.k.dtype == torch.bfloat16 and ref.ks is None
    assert c.k.dtype == c.v.dtype == torch.int8 and c.ks.dtype == c.vs.dtype == torch.float32
    assert c.ks.shape == c.k.shape[:3]
    # a slot row: D bf16 (2D bytes) against D int8 + an fp32 scale (D + 4 bytes)
    d = tiny_llama64.config.head_dim
    assert c.num_blocks == 2**20 // PagedKVCache.bytes_per_block(2, 8, 1, d, torch.int8)
    assert c.num_blocks >= 1.8 * ref.num_blocks


def test_int8_outputs_stay_close_to_a_bf16_cache(tiny_llama64):
    assert_outputs_close(make_llm(tiny_llama64), make_llm(tiny_llama64, kv_cache_dtype="int8"), seed=71,
                         max_drift=0.1)


def test_int8_rows_do_not_depend_on_the_batch_or_the_chunking(tiny_llama64):
    """Eight prompts together with prefill chunks of 24 tokens mixed with decodes, against each
    alone with its prompt in one chunk: the same tokens and the same logprobs, bit for bit."""
    ps = prompts(8, seed=72, lo=20, hi=90)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    together = make_llm(tiny_llama64, kv_cache_dtype="int8", max_num_batched_tokens=24).generate(ps, params)
    solo = make_llm(tiny_llama64, kv_cache_dtype="int8", max_num_batched_tokens=256)
    for p, t in zip(ps, together):
        alone = solo.generate([p], params)[0].outputs[0]
        assert alone.token_ids == t.outputs[0].token_ids
        assert alone.logprobs == t.outputs[0].logprobs


def test_int8_samples_share_the_prompt_and_copy_its_scales(tiny_llama64):
    """n = 3 at temperature 1 shares the prompt's blocks (a partial last block is copied on write,
    scales included): each seeded sample equals the same request made with n = 1 and its index."""
    llm = make_llm(tiny_llama64, kv_cache_dtype="int8", enable_prefix_caching=False)
    d = tiny_llama64.config.head_dim
    p = prompts(1, seed=73, lo=21, hi=21)  # 21 tokens: the third block of 8 is partial
    out = llm.generate(p, SamplingParams(temperature=1.0, n=3, max_tokens=8, seed=5))[0].outputs
    assert len({tuple(o.token_ids) for o in out}) > 1
    c = PagedKVCache(2, 4, 8, 1, d, torch.int8)
    c.k[:, :, 8:16] = 7
    c.ks[:, :, 8:16] = 0.5
    c.copy_blocks([(1, 3)])
    assert (c.k[:, :, 24:32] == 7).all() and (c.ks[:, :, 24:32] == 0.5).all() and (c.vs[:, :, 24:32] == 0).all()


def test_int8_is_refused_where_the_kernels_cannot_read_it(tiny_llama64, tiny_llama):
    with pytest.raises(ValueError, match="kv_cache_dtype: int8 .*float32 model"):
        make_llm(tiny_llama, kv_cache_dtype="int8")  # fp32 (and head size 16)
    bf16_16 = load_dir(str(tiny_llama.source), dtype="bfloat16")
    with pytest.raises(ValueError, match="kv_cache_dtype: int8 .*head size 16"):
        make_llm(bf16_16, kv_cache_dtype="int8")
    with kernels.disabled():
        with pytest.raises(ValueError, match="kv_cache_dtype: int8 .*no CPU kernels"):
            make_llm(tiny_llama64, kv_cache_dtype="int8")


def test_int8_cache_with_adapters_in_one_batch(tiny_llama64, tmp_path):
    """LoRA adapters over an int8 cache (their decode steps take the one-call path with the
    cache's scales): each request's tokens and logprobs are the same alone and in a mixed batch."""
    import transformers

    from shoal.config import EngineConfig
    from shoal.engine.llm import LLM
    from tests.lora import make_peft_adapter

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama64.source, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    llm = LLM(EngineConfig(model="tiny", block_size=8, num_kv_blocks=512, max_num_batched_tokens=64,
                           enable_lora=True, max_loras=4, max_lora_rank=8, max_cpu_loras=4, kv_cache_dtype="int8"),
              loaded=load_dir(str(tiny_llama64.source), dtype="bfloat16"))
    for i in range(2):
        make_peft_adapter(hf, tmp_path / f"ad{i}", seed=i, b_std=0.3, r=8, lora_alpha=16, target_modules=targets)
        llm.add_adapter(f"ad{i}", str(tmp_path / f"ad{i}"))
    names = [None, "ad0", "ad1"] * 2
    ps = prompts(len(names), seed=74, lo=10, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)

    def key(o):
        return o.outputs[0].token_ids, [lp for _, lp, _ in o.outputs[0].logprobs]

    mixed = [key(o) for o in llm.generate(ps, params, adapter=names)]
    assert mixed == [key(llm.generate([p], params, adapter=a)[0]) for p, a in zip(ps, names)]
    assert any(key(llm.generate([ps[i]], params)[0]) != mixed[i] for i in (1, 2))


def test_int8_preemption_recomputes_and_frees_every_block(tiny_llama64):
    """A KV budget so small that sequences are preempted and recomputed (their int8 rows and
    scales written again): every request completes with the tokens the ample budget gives (the
    recomputed positions take the prefill kernel instead of the decode one, so a near-tie could
    in principle flip; measured: none here), and every block comes back."""
    ps = prompts(8, seed=75, lo=30, hi=40)
    want = [o.outputs[0].token_ids for o in make_llm(tiny_llama64, kv_cache_dtype="int8").generate(ps, GREEDY)]
    llm = make_llm(tiny_llama64, kv_cache_dtype="int8", num_kv_blocks=14, max_num_batched_tokens=64)
    eng = llm.engine
    for p in ps:
        eng.add_request(None, p, GREEDY)
    preempted, got = 0, {}
    while eng.has_unfinished():
        preempted = max(preempted, sum(s.num_preemptions for r in eng.requests.values() for s in r.seqs))
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.outputs[0].token_ids
    assert preempted > 0
    assert sorted(got.values()) == sorted(want)
    assert eng.block_manager.num_free_blocks == 14
