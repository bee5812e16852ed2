"""Many LoRA adapters in one engine batch: per row the same greedy tokens as that adapter alone
with its weights merged into the base; LRU slot swaps with max_loras=2; seeded determinism
among adapters; bad adapters refused while the engine keeps serving."""

from __future__ import annotations

import pytest
import torch
import transformers

from shoal.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.sampling_params import SamplingParams
from shoal.model.generate import generate
from shoal.model.loader import load_dir
from tests.engine.test_llm_engine import STOPS, prompts
from tests.helpers import hf_tiny_config, save_tiny_hf_dir
from tests.lora import make_peft_adapter, merged_hf, ours_like

ADAPTERS = [  # (rank, alpha, target modules)
    (2, 4, ["q_proj", "v_proj"]),
    (4, 8, ["k_proj", "o_proj"]),
    (8, 8, ["gate_proj", "up_proj", "down_proj"]),
    (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    (4, 16, ["up_proj"]),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lora_engine")
    save_tiny_hf_dir(hf_tiny_config("llama", max_position_embeddings=512), root / "base",
                     tiny_tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    paths, merged = {}, {}
    for i, (r, alpha, targets) in enumerate(ADAPTERS):
        path = root / f"ad{i}"
        make_peft_adapter(hf, path, seed=i, b_std=0.3, r=r, lora_alpha=alpha, target_modules=targets)
        paths[f"ad{i}"] = str(path)
        merged[f"ad{i}"] = ours_like(merged_hf(hf, path))
    merged[None] = ours_like(hf)
    return root, paths, merged


def engine(root, paths, **kw):
    cfg = dict(model="tiny", block_size=8, num_kv_blocks=512, max_num_batched_tokens=128,
               enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=8)
    cfg.update(kw)
    llm = LLM(EngineConfig(**cfg), loaded=load_dir(str(root / "base"), dtype="float32"))
    for name, path in paths.items():
        llm.add_adapter(name, path)
    return llm


def test_mixed_adapter_batch_equals_merged_weights(setup):
    root, paths, merged = setup
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"] * 3
    ps = prompts(len(names), seed=30)
    outs = engine(root, paths).generate(ps, SamplingParams(temperature=0.0, max_tokens=10),
                                        adapter=names)
    differs = 0
    for p, name, out in zip(ps, names, outs):
        want = generate(merged[name], p, 10, stop_token_ids=STOPS)
        assert out.outputs[0].token_ids == want, name
        differs += want != generate(merged[None], p, 10, stop_token_ids=STOPS)
    assert differs > 0  # the adapters really change the output


def test_adapter_rows_in_flight_equal_merged_weights(setup):
    """`async_scheduling`: chained steps of base and adapter rows (each row's slot as in a
    synchronous step) give each adapter's merged-weights tokens; with 2 slots for 5 adapters the
    steps that must swap slots run synchronously."""
    root, paths, merged = setup
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"] * 2
    ps = prompts(len(names), seed=32)
    sp = SamplingParams(temperature=0.0, max_tokens=12)
    for kw in ({}, {"max_loras": 2, "max_cpu_loras": 2}):
        llm = engine(root, paths, async_scheduling=True, **kw)
        outs = llm.generate(ps, sp, adapter=names)
        for p, name, out in zip(ps, names, outs):
            assert out.outputs[0].token_ids == generate(merged[name], p, 12, stop_token_ids=STOPS), (kw, name)
        assert llm.engine.ahead.chains > 0


def test_two_slots_serve_five_adapters(setup):
    root, paths, merged = setup
    llm = engine(root, paths, max_loras=2, max_cpu_loras=2)
    names = ["ad0", "ad1", "ad2", "ad3", "ad4", None, "ad2", "ad0"]
    ps = prompts(len(names), seed=31)
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=8), adapter=names)
    for p, name, out in zip(ps, names, outs):
        assert out.outputs[0].token_ids == generate(merged[name], p, 8, stop_token_ids=STOPS)


def test_seeded_request_identical_among_other_adapters(setup):
    root, paths, _ = setup
    target = prompts(1, seed=32, lo=30, hi=30)[0]
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=99, ignore_eos=True)
    alone = engine(root, paths).generate([target], params, adapter="ad3")[0].outputs[0].token_ids
    others = prompts(32, seed=33, lo=4, hi=70)
    names = ["ad3"] + [[None, "ad0", "ad1", "ad2", "ad4"][i % 5] for i in range(32)]
    ps = [params] + [SamplingParams(temperature=0.9, max_tokens=5 + i % 9, ignore_eos=True)
                     for i in range(32)]
    outs = engine(root, paths, max_num_batched_tokens=100).generate([target] + others, ps,
                                                                     adapter=names)
    assert outs[0].outputs[0].token_ids == alone


def test_bad_adapters_are_refused_and_others_keep_working(setup, tmp_path):
    root, paths, merged = setup
    small = {k: v for k, v in paths.items() if k != "ad3"}
    llm = engine(root, small, max_lora_rank=8)  # ad3 (rank 16) is too big for this engine
    with pytest.raises(ValueError, match="16.*8|max_lora_rank"):
        llm.add_adapter("big", paths["ad3"])
    with pytest.raises(ValueError, match="adapter|model"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), adapter="big")
    p = prompts(1, seed=34)[0]
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=6), adapter="ad1")[0]
    assert out.outputs[0].token_ids == generate(merged["ad1"], p, 6, stop_token_ids=STOPS)


def test_bf16_adapters_on_packed_layers_keep_their_bits_in_a_mixed_batch(setup):
    """bf16 engine (on a CPU with AMX or AVX512-BF16 its linears are `PackedBF16Linear`, LoRA
    wrapping them): each request's tokens and logprobs are the same alone and in a batch mixing base
    and 5 adapters, and the adapters change the output."""
    from shoal.kernels import qlinear as amx
    from shoal.model.bf16_linear import PackedBF16Linear

    root, paths, _ = setup
    cfg = dict(model="tiny", block_size=8, num_kv_blocks=512, max_num_batched_tokens=128,
               enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=8)
    llm = LLM(EngineConfig(**cfg), loaded=load_dir(str(root / "base"), dtype="bfloat16"))
    for name, path in paths.items():
        llm.add_adapter(name, path)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, PackedBF16Linear)]
    assert bool(layers) == amx.packed_ready()
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"] * 2
    ps = prompts(len(names), seed=31)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)

    def key(o):
        return o.outputs[0].token_ids, [lp for _, lp, _ in o.outputs[0].logprobs]

    mixed = [key(o) for o in llm.generate(ps, params, adapter=names)]
    alone = [key(llm.generate([p], params, adapter=a)[0]) for p, a in zip(ps, names)]
    assert mixed == alone
    base = [key(llm.generate([ps[i]], params)[0]) for i in range(1, 6)]
    assert any(b != m for b, m in zip(base, mixed[1:6]))
