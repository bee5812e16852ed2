"""bf16 engines on a CPU with AVX-512 (any of the packed products' bodies) run their linears on our packed kernel
(`PackedBF16Linear`) for every model family: greedy tokens match plain F.linear weights, and each
request's tokens and logprobs are the same alone as in a batch."""

from __future__ import annotations

import pytest
import torch

from shoal.engine.sampling_params import SamplingParams
from shoal.kernels import qlinear as amx
from shoal.model.bf16_linear import PackedBF16Linear
from shoal.model.loader import load_dir
from tests.engine.test_llm_engine import make_llm, prompts
from tests.helpers import hf_tiny_config, save_tiny_hf_dir


@pytest.mark.skipif(not amx.packed_ready(), reason="no packed products on this CPU (they need AVX-512)")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral"])
def test_bf16_families_on_packed_products(tmp_path, tiny_tokenizer_dir, family):
    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config(family), tmp_path / family, tiny_tokenizer_dir)
    ps = prompts(6, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)
    plain = make_llm(load_dir(str(tmp_path / family), dtype="bfloat16"), pack_weights=False)
    assert not any(isinstance(m, PackedBF16Linear) for m in plain.engine.model.modules())
    llm = make_llm(load_dir(str(tmp_path / family), dtype="bfloat16"))
    assert isinstance(llm.engine.model.lm_head, PackedBF16Linear)  # (a tied head's embedding reads it)

    def key(o):
        return o.outputs[0].token_ids, [lp for _, lp, _ in o.outputs[0].logprobs]

    want = [o.outputs[0].token_ids for o in plain.generate(ps, params)]
    got = [key(o) for o in llm.generate(ps, params)]
    assert sum(g[0] == w for g, w in zip(got, want)) >= 5  # tiny random models have near-ties
    assert got == [key(llm.generate([p], params)[0]) for p in ps]
