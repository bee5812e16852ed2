"""EngineConfig.kv_cache_dtype: a 16-bit KV cache under an fp32 model holds twice the tokens in
the same budget, stores keys/values rounded once, and keeps outputs close to the fp32 cache."""

from __future__ import annotations

import pytest
import torch

from shoal.config import EngineConfig
from shoal.engine.sampling_params import SamplingParams
from tests.engine.test_llm_engine import make_llm, prompts


def test_bf16_cache_doubles_blocks_and_stays_close_to_fp32(tiny_llama):
    assert next(tiny_llama.model.parameters()).dtype == torch.float32
    budget = dict(num_kv_blocks=None, kv_cache_memory=2**20)
    ref = make_llm(tiny_llama, **budget)
    half = make_llm(tiny_llama, kv_cache_dtype="bfloat16", **budget)
    cache = half.engine.runner.cache
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert ref.engine.runner.cache.k.dtype == torch.float32
    assert cache.num_blocks == 2 * ref.engine.runner.cache.num_blocks  # same kv_cache_memory
    assert_outputs_close(ref, half, seed=61, max_drift=0.05)


def assert_outputs_close(ref, other, seed: int, max_drift: float) -> None:
    """12 prompts, 10 greedy tokens each through both engines. Where the tokens agree their
    logprobs differ by less than max_drift (the cache's rounding); where a sequence first parts
    from the reference, that step was a near-tie in the reference (random tiny models have them):
    the other engine's token is the reference's runner-up, within 2 max_drift of its pick. Most
    sequences agree throughout (at least half: the count of near-ties depends on the CPU's
    rounding, 8 to 12 of the 12 measured)."""
    ps = prompts(12, seed=seed, lo=10, hi=60)
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=2)
    want, got = ref.generate(ps, params), other.generate(ps, params)
    same, diffs = 0, []
    for a, b in zip(want, got):
        ta, tb = a.outputs[0].logprobs, b.outputs[0].logprobs
        part = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x[0] != y[0]), None)
        same += part is None
        diffs += [abs(x[1] - y[1]) for x, y in zip(ta[:part], tb[:part])]
        if part is not None:
            top = ta[part][2]  # the reference's top-2 at the parting step
            assert tb[part][0] in top, (ta[part], tb[part])
            assert top[ta[part][0]] - top[tb[part][0]] < 2 * max_drift, (ta[part], tb[part])
    assert same >= 6, same
    assert diffs and max(diffs) < max_drift, max(diffs)


def test_stored_values_are_rounded_once(tiny_llama):
    """One prompt into both caches: layer 0's keys/values are the fp32 cache's rounded to bf16
    (later layers differ a little more: they attend over rounded keys)."""
    ps = prompts(1, seed=62, lo=20, hi=20)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    caches = []
    for kv in ("auto", "bfloat16"):
        llm = make_llm(tiny_llama, kv_cache_dtype=kv, enable_prefix_caching=False)
        llm.generate(ps, params)
        caches.append(llm.engine.runner.cache)
    full, half = caches  # same prompt, same block allocation: the same slots were written
    assert full.k.abs().sum() > 0
    assert torch.equal(half.k[0], full.k[0].to(torch.bfloat16))
    assert torch.equal(half.v[0], full.v[0].to(torch.bfloat16))
    rel = (half.k.float() - full.k).norm() / full.k.norm()
    assert 0 < rel < 0.01, rel


def test_bad_kv_cache_dtype_names_the_field():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int4")
