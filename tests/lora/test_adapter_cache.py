"""LoRAManager end to end on tiny Llama and GPT-2 models with real PEFT adapters.

Semantics held: a batch mixing the base model and several adapters gives, per row, the logits of
HF+PEFT with that one adapter merged (and base rows the plain base model), whatever the slot
count, LRU swaps and CPU-tier evictions in between."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from shoal.lora import AdapterError, LoRAManager
from tests.helpers import TINY_VOCAB
from tests.lora import PackedCausal, make_peft_adapter, merged_hf, ours_like, pair

T = 9
LLAMA_ADAPTERS = {  # different ranks and targets; together all of q/k/v/o/gate/up/down
    "qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "ko": dict(r=4, lora_alpha=4, target_modules=["k_proj", "o_proj"]),
    "mlp": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "all": dict(r=16, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
    "pat": dict(r=4, lora_alpha=8, rank_pattern={"down_proj": 8}, alpha_pattern={"q_proj": 32},
                target_modules=r"model\.layers\.1\.(self_attn\.q_proj|mlp\.down_proj)|.*0\.mlp\.up_proj"),
}
GPT2_ADAPTERS = {
    "attn": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "full": dict(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]),
    "mlp_out": dict(r=2, lora_alpha=2, target_modules=r".*\.mlp\.c_proj"),
}


def build(family: str, specs: dict, tmp_path_factory):
    hf, _ = pair(family)
    root = tmp_path_factory.mktemp(f"{family}_adapters")
    paths, refs = {}, {}
    for i, (name, kw) in enumerate(specs.items()):
        paths[name] = str(root / name)
        make_peft_adapter(hf, paths[name], seed=10 + i, **kw)
        refs[name] = merged_hf(hf, paths[name])
    refs[None] = hf
    return hf, paths, refs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build("llama", LLAMA_ADAPTERS, tmp_path_factory)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return build("gpt2", GPT2_ADAPTERS, tmp_path_factory)


def manager(setup, max_loras=8, max_lora_rank=16, max_cpu_loras=8, names=None):
    hf, paths, _ = setup
    mgr = LoRAManager(ours_like(hf), max_loras, max_lora_rank, max_cpu_loras)
    for name in names if names is not None else paths:
        mgr.add_adapter(name, paths[name])
    return mgr


def tokens(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (b, T), generator=torch.Generator().manual_seed(seed))


def check_rows(mgr, refs, rows: list[str | None], seed: int = 0) -> None:
    """Prepare, map per row, one (B, T) forward; each row must equal its reference model."""
    mgr.prepare({r for r in rows if r is not None})
    mgr.set_mapping(rows)
    x = tokens(len(rows), seed)
    with torch.no_grad():
        got = mgr.model.logits(x)
        for i, name in enumerate(rows):
            want = refs[name](x[i:i + 1]).logits[0]
            assert (got[i] - want).abs().max().item() <= 1e-4, (i, name)


def test_adapters_change_the_output(llama, gpt2):
    """Guards the tests below: every adapter moves the logits well beyond the tolerance."""
    for _, _, refs in (llama, gpt2):
        x = tokens(1)
        with torch.no_grad():
            base = refs[None](x).logits
            for name, ref in refs.items():
                if name is not None:
                    assert (ref(x).logits - base).abs().max().item() > 1e-2, name


@pytest.mark.parametrize("rows", [
    [None, "qv", "ko", "mlp", "all", "pat"],                 # sorted: slices
    ["pat", None, "qv", "all", "qv", "mlp", None, "ko"],     # interleaved: index gather
])
def test_mixed_batch_matches_peft_merged_llama(llama, rows):
    mgr = manager(llama)
    check_rows(mgr, llama[2], rows)


def test_mixed_batch_matches_peft_merged_gpt2(gpt2):
    mgr = manager(gpt2)
    check_rows(mgr, gpt2[2], ["full", None, "attn", "mlp_out", "attn"])


def test_gpt2_matches_our_merged_weights(gpt2):
    """W + scaling * B @ A in our own (out, in) layout, against the same adapter unmerged."""
    hf, paths, _ = gpt2
    mgr = manager(gpt2, names=["full"])
    mgr.prepare({"full"})
    mgr.set_mapping(["full"])
    adapter = mgr.prefetch("full")
    merged = ours_like(hf)
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for path, (a, b) in adapter.weights.items():
            mods[path].weight += adapter.scaling_for(path) * b @ a
        x = tokens(1, seed=3)
        assert (mgr.model.logits(x) - merged.logits(x)).abs().max().item() <= 1e-4


def test_packed_tokens_sorted_by_adapter(llama):
    """The engine's layout: (N,) tokens of several sequences, grouped by adapter, per-token slots."""
    _, _, refs = llama
    mgr = manager(llama)
    seqs = [(None, 5), ("ko", 7), ("ko", 3), ("mlp", 6), ("pat", 4), ("all", 8)]
    mgr.prepare({n for n, _ in seqs if n})
    ids = [tokens(1, seed=20 + i)[0, :n] for i, (_, n) in enumerate(seqs)]
    mgr.set_mapping([name for name, n in seqs for _ in range(n)])
    assert all(isinstance(t, slice) for _, t in mgr.mapping.plan((sum(n for _, n in seqs),)))
    positions = torch.cat([torch.arange(n) for _, n in seqs])
    with torch.no_grad():
        got = mgr.model.logits(torch.cat(ids), positions, PackedCausal([n for _, n in seqs]))
        start = 0
        for (name, n), x in zip(seqs, ids):
            want = refs[name](x[None]).logits[0]
            assert (got[start:start + n] - want).abs().max().item() <= 1e-4, name
            start += n


def test_two_slots_five_adapters_lru(llama):
    _, _, refs = llama
    mgr = manager(llama, max_loras=2, max_cpu_loras=8)
    batches = [["qv", None, "ko"], ["mlp", "mlp"], ["ko", "all"], ["pat", None], ["qv", "pat"],
               ["all", "ko"], [None]]
    for i, rows in enumerate(batches):
        check_rows(mgr, refs, rows, seed=i)
    assert mgr.disk_loads == 5  # every adapter read once; swaps came from the CPU tier
    mgr.prepare({"qv", "ko"})
    slot_ko = mgr.slot_of("ko")
    mgr.prepare({"ko"})  # ko now most recent, qv least
    mgr.prepare({"mlp"})
    assert mgr.slot_of("qv") is None and mgr.slot_of("ko") == slot_ko
    assert mgr.prepare({"ko", "mlp"}) == {"ko": slot_ko, "mlp": 1 - slot_ko}
    with pytest.raises(AdapterError, match="3 adapters in one batch exceed max_loras 2"):
        mgr.prepare({"qv", "ko", "mlp"})
    with pytest.raises(AdapterError, match="'qv': not resident"):
        mgr.set_mapping(["qv"])


def test_cpu_tier_eviction_reloads_from_disk(llama):
    _, _, refs = llama
    mgr = manager(llama, max_loras=1, max_cpu_loras=2)
    for i, (name, loads) in enumerate([("qv", 1), ("ko", 2), ("qv", 2), ("mlp", 3), ("ko", 4),
                                       ("qv", 5), ("qv", 5)]):
        check_rows(mgr, refs, [name, None], seed=i)
        assert mgr.disk_loads == loads, (i, name)


def test_errors_name_the_problem_and_others_keep_working(llama, gpt2, tmp_path):
    hf, paths, refs = llama
    mgr = manager(llama, max_lora_rank=8, names=["qv", "mlp"])
    with pytest.raises(AdapterError, match="r: adapter rank 16 exceeds max_lora_rank 8"):
        mgr.add_adapter("all", paths["all"])
    with pytest.raises(ValueError, match="target_modules: 'c_attn'"):
        mgr.add_adapter("gpt", gpt2[1]["attn"])
    nofile = tmp_path / "nofile"
    shutil.copytree(paths["ko"], nofile)
    os.remove(nofile / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors: not found"):
        mgr.add_adapter("nofile", str(nofile))
    make_peft_adapter(hf, tmp_path / "dora", seed=5, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        mgr.add_adapter("dora", str(tmp_path / "dora"))
    with pytest.raises(AdapterError, match="already registered"):
        mgr.add_adapter("qv", paths["ko"])
    with pytest.raises(AdapterError, match="'nope': no such adapter"):
        mgr.prepare({"nope"})
    # registered fine, then its file vanishes before it is first loaded
    gone = tmp_path / "gone"
    shutil.copytree(paths["ko"], gone)
    mgr.add_adapter("gone", str(gone))
    shutil.rmtree(gone)
    with pytest.raises(ValueError, match="gone"):
        mgr.prepare({"gone", "qv"})
    assert mgr.list_adapters() == ["qv", "mlp", "gone"]
    check_rows(mgr, refs, ["mlp", None, "qv"])


def test_remove_frees_the_slot(llama):
    _, paths, refs = llama
    mgr = manager(llama, max_loras=2, names=["qv", "ko", "mlp"])
    slots = mgr.prepare({"qv", "ko"})
    mgr.remove_adapter("qv")
    assert not mgr.has_adapter("qv") and mgr.slot_of("qv") is None
    assert mgr.prepare({"mlp"}) == {"mlp": slots["qv"]}
    assert mgr.slot_of("ko") == slots["ko"]
    with pytest.raises(AdapterError, match="no such adapter"):
        mgr.remove_adapter("qv")
    check_rows(mgr, refs, ["ko", "mlp", None])
    mgr.add_adapter("qv", paths["qv"])  # the name can be registered again
    check_rows(mgr, refs, ["qv", "ko"])


def test_base_only_batch_equals_plain_model(llama):
    hf, _, _ = llama
    mgr = manager(llama, names=["all"])
    mgr.prepare({"all"})
    plain = ours_like(hf)
    x = tokens(3)
    for mapping in ([None, None, None], None):
        mgr.set_mapping(mapping) if mapping else mgr.clear_mapping()
        with torch.no_grad():
            assert torch.equal(mgr.model.logits(x), plain.logits(x))


def test_disk_reads_do_not_hold_the_lock(llama, monkeypatch):
    """Registration, listing and other threads' calls proceed while an adapter is read."""
    import shoal.lora.adapter_cache as cache

    mgr = manager(llama, names=["qv", "mlp"])
    held = []
    real = cache.load_adapter

    def spy(path, name=None):
        held.append(mgr._lock.locked())
        return real(path, name)

    monkeypatch.setattr(cache, "load_adapter", spy)
    mgr.prefetch("qv")
    mgr.prepare({"qv", "mlp"})
    assert held == [False, False] and mgr.disk_loads == 2


def test_from_engine_config(llama):
    from shoal.config import EngineConfig

    mgr = LoRAManager.from_config(ours_like(llama[0]), EngineConfig(max_loras=3, max_lora_rank=8,
                                                                    max_cpu_loras=5))
    layer = mgr.mapping.layers["model.layers.0.mlp.gate_proj"]
    assert (mgr.max_loras, mgr.max_lora_rank, mgr.max_cpu_loras) == (3, 8, 5)
    assert layer.lora_a_stacked.shape == (3, 8, 64) and layer.lora_b_stacked.shape == (3, 8, 96)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        LoRAManager(ours_like(llama[0]), 4, 8, 2)
