"""Logits and greedy-generation parity with Hugging Face transformers on tiny random models of
each family (Llama, Llama-3 rope scaling, Qwen2 with q/k/v bias, Mistral sliding window, GPT-2),
with and without the KV cache, plus the dense KV cache's chunking semantics."""

from __future__ import annotations

import pytest
import torch

from shoal.model.attention import DenseKVCache
from shoal.model.config import ModelConfig
from shoal.model.generate import generate
from shoal.model.loader import to_model_tensors
from shoal.model.weights import build_model
from tests.helpers import TINY_VOCAB, hf_model, hf_tiny_config

FAMILIES = ["llama", "llama3", "qwen2", "mistral", "gpt2"]


def pair(family: str, seed: int = 0):
    """(hf_model, our_model) with identical random weights."""
    torch.manual_seed(seed)
    hf = hf_model(hf_tiny_config(family))
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    ours = build_model(cfg, to_model_tensors(hf.state_dict(), cfg))
    return hf, ours


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf(family):
    hf, ours = pair(family)
    x = torch.randint(0, TINY_VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours.logits(x)
    assert got.shape == ref.shape == (3, 40, TINY_VOCAB)
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_steps_match_hf_with_and_without_cache(family):
    hf, ours = pair(family, seed=2)
    prompt = [5, 17, 42, 99, 7]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(prompt):].tolist()
    assert len(ref) == 32
    assert generate(ours, prompt, 32) == ref
    assert generate(ours, prompt, 32, use_cache=False) == ref


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_dense_cache_chunks_equal_one_pass(family):
    """Semantics: feeding a sequence in chunks through the cache equals one causal pass."""
    _, ours = pair(family, seed=3)
    x = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours.logits(x)
        cache = DenseKVCache.for_model(ours, batch=2, max_len=24)
        parts = []
        for start, end in [(0, 10), (10, 11), (11, 20), (20, 24)]:
            pos = torch.arange(start, end).expand(2, -1)
            parts.append(ours.logits(x[:, start:end], pos, cache))
    assert cache.length == 24
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


def test_tied_embeddings_share_storage():
    _, ours = pair("qwen2")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    _, untied = pair("llama")
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_module_names_are_hf_names():
    """LoRA target_modules must mean what they mean in PEFT."""
    for family, want in [("llama", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                    "down_proj"}),
                         ("gpt2", {"c_attn", "c_proj", "c_fc"})]:
        hf, ours = pair(family)
        leaf = lambda m: {n.split(".")[-1] for n, mod in m.named_modules()  # noqa: E731
                          if isinstance(mod, torch.nn.Linear) and n != "lm_head"}
        assert leaf(ours) == want
        ours_names = {n for n, _ in ours.named_modules() if n.split(".")[-1] in want}
        hf_names = {n for n, _ in hf.named_modules() if n.split(".")[-1] in want}
        assert ours_names == hf_names


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    _, ours = pair("llama")
    a = generate(ours, [1, 2, 3], 24, temperature=1.0, top_p=0.9, seed=7)
    b = generate(ours, [1, 2, 3], 24, temperature=1.0, top_p=0.9, seed=7)
    c = generate(ours, [1, 2, 3], 24, temperature=1.0, top_p=0.9, seed=8)
    assert a == b
    assert a != c


def test_stop_token_ends_generation():
    _, ours = pair("llama")
    free = generate(ours, [1, 2, 3], 16)
    stop = free[4]
    first = free.index(stop)
    assert generate(ours, [1, 2, 3], 16, stop_token_ids=[stop]) == free[: first + 1]


def test_context_overflow_is_a_clear_error():
    _, ours = pair("gpt2")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, [1] * 200, 100)


def test_bf16_runs_and_agrees_on_argmax():
    hf, ours32 = pair("llama")
    cfg = ours32.config
    ours16 = build_model(cfg, to_model_tensors(hf.state_dict(), cfg), dtype=torch.bfloat16)
    x = torch.randint(0, TINY_VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ours32.logits(x), ours16.logits(x)
    assert ours16.lm_head.weight.dtype == torch.bfloat16
    assert (a - b).abs().max().item() < 0.1


def test_head_logits_equal_linear_in_every_orientation():
    """compute_logits' product (weight-major mm for fp32 with 2..64 rows, else the module):
    F.linear's values within fp32 rounding, any leading shape; anything but a plain fp32 Linear
    (bf16, a bias, split-K in effect, weight None as in QuantLinear) is the module's own output."""
    from shoal.model.layers import Linear, head_logits

    g = torch.Generator().manual_seed(0)
    head = Linear(96, 500, bias=False)
    torch.nn.init.normal_(head.weight, generator=g)
    for shape in [(96,), (1, 96), (2, 96), (8, 96), (64, 96), (65, 96), (3, 7, 96)]:
        x = torch.randn(shape, generator=g)
        got = head_logits(head, x)
        assert got.shape == (*shape[:-1], 500) and got.dtype == torch.float32 and got.is_contiguous()
        assert (got - torch.nn.functional.linear(x, head.weight)).abs().max().item() < 1e-4
    x = torch.randn(8, 96, generator=g)
    assert torch.equal(head_logits(head, x), torch.mm(head.weight, x.t()).t())  # the mm path
    bf = Linear(96, 500, bias=False).to(torch.bfloat16)
    assert torch.equal(head_logits(bf, x.bfloat16()), bf(x.bfloat16()).float())
    biased = Linear(96, 500)
    assert torch.equal(head_logits(biased, x), biased(x))
    head.k_chunk = 64  # split-K applies (K = 96 > 64): the module's semantics
    assert torch.equal(head_logits(head, x), head(x))
    head.k_chunk = 0

    class NoWeight(Linear):  # like QuantLinear: weight None, its own forward
        def __init__(self):
            super().__init__(96, 500, bias=False)
            self.register_parameter("weight", None)

        def forward(self, x):
            return x.sum(-1, keepdim=True).expand(*x.shape[:-1], 500)

    assert torch.equal(head_logits(NoWeight(), x), x.sum(-1, keepdim=True).expand(8, 500))
