"""The engine's GPU attention path (`TritonAttention`: decode rows and prefill chunks read the
paged cache in place) run on the CPU under Triton's interpreter: the reference tokens through
mixed steps, chunked prefill, prefix-cache hits, a sliding window, and the decode graphs'
fixed-shape function."""

from __future__ import annotations

import pytest

from shoal.engine.sampling_params import SamplingParams
from shoal.engine.triton_attention import TritonAttention, pad_tables
from tests.engine.test_engine_lora import setup  # noqa: F401  (module fixture)
from tests.engine.test_llm_engine import GREEDY, make_llm, prompts, ref
from tests.kernels.triton_interp import interpreted

kern = interpreted("shoal.kernels.triton_decode", "shoal.kernels.triton_prefill", "shoal.kernels.triton_elementwise")


def triton_llm(loaded, graphs: bool = False, **kw):
    llm = make_llm(loaded, **kw)
    runner = llm.engine.runner
    assert not runner.triton_attention  # CPU default: the gather path / CPU kernels
    runner.triton_attention = True
    runner.cpu_decode_forward = False  # (the CPU's flat decode forward has its own attention)
    if graphs:
        runner.use_decode_graphs(capture=False)  # the graphs' function, run eagerly
    return llm


@pytest.mark.parametrize("graphs", [False, True])
def test_mixed_steps_and_chunked_prefill_give_reference_tokens(kern, tiny_llama, graphs):
    ps = prompts(6, seed=41, lo=5, hi=45)
    llm = triton_llm(tiny_llama, graphs=graphs, max_num_batched_tokens=24)  # chunks start mid-prompt
    seen = []
    orig = TritonAttention.attend

    def spy(self, *a):
        seen.append((self.num_decode, self.prefill is not None))
        return orig(self, *a)

    TritonAttention.attend = spy
    try:
        outs = llm.generate(ps, GREEDY)
    finally:
        TritonAttention.attend = orig
    assert [o.outputs[0].token_ids for o in outs] == [ref(tiny_llama.model, p) for p in ps]
    assert any(nd and pre for nd, pre in seen)  # steps mixing decode rows and prefill chunks ran
    if graphs:
        assert llm.engine.runner.graphs.graphs  # decode-only steps took the graphs' function


@pytest.mark.parametrize("graphs", [False, True])
def test_flights_feed_the_graphs_and_the_triton_path(kern, tiny_llama, graphs):
    """`async_scheduling` with the CUDA path's sampling: chained steps read each row's token from
    the step in flight (into the graphs' inputs, or the eager step's ids): the reference tokens."""
    ps = prompts(5, seed=45, lo=5, hi=30)
    llm = triton_llm(tiny_llama, graphs=graphs, max_num_batched_tokens=64, async_scheduling=True)
    llm.engine.ahead.device_ops = True
    outs = llm.generate(ps, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [ref(tiny_llama.model, p) for p in ps]
    assert llm.engine.ahead.chains >= 5
    if graphs:
        assert llm.engine.runner.graphs.graphs


def test_prefix_cache_hit_and_sliding_window(kern, tiny_llama, tiny_mistral):
    llm = triton_llm(tiny_llama)
    shared = prompts(1, seed=42, lo=30, hi=30)[0]
    llm.generate([shared + [5, 6]], GREEDY)
    out = llm.generate([shared + [7, 8, 9]], GREEDY)[0]
    assert out.num_cached_tokens == 24  # whole blocks of 8: the chunk starts mid-sequence
    assert out.outputs[0].token_ids == ref(tiny_llama.model, shared + [7, 8, 9])
    ps = prompts(3, seed=43, lo=10, hi=30)  # Mistral's window of 8 is shorter than the prompts
    sp = SamplingParams(temperature=0.0, max_tokens=10)
    outs = triton_llm(tiny_mistral, max_num_batched_tokens=16).generate(ps, sp)
    assert [o.outputs[0].token_ids for o in outs] == [ref(tiny_mistral.model, p, 10) for p in ps]


def test_chunk_slots_are_each_positions_slot():
    """Short chunks in the shared array, long ones as tensors, in order after the lead."""
    import random

    import torch

    from shoal.engine.triton_attention import chunk_slots

    rng = random.Random(0)
    bs = 8
    chunks = []
    for length in (1, 1, 3, 200, 5, 64, 1, 130, 9):
        start = rng.randrange(0, 40)
        end = start + length
        chunks.append(([rng.randrange(1000) for _ in range(-(-end // bs))], start, end))
    want = [7, 9] + [t[p // bs] * bs + p % bs for t, s, e in chunks for p in range(s, e)]
    got = chunk_slots([7, 9], chunks, bs)
    assert got.dtype == torch.long and got.tolist() == want
    assert chunk_slots([], [], bs).tolist() == [] and chunk_slots([4], [], bs).tolist() == [4]


def test_pad_tables():
    t = pad_tables([[3, 1], [], [7, 8, 9]], "cpu")
    assert t.tolist() == [[3, 1, 0], [0, 0, 0], [7, 8, 9]] and str(t.dtype) == "torch.int32"


def test_fused_elementwise_kernels_in_the_engine(kern, tiny_llama, tiny_mistral, monkeypatch):
    """`gpu_ops` (RMSNorm + residual, RoPE, SiLU-and-multiply as Triton kernels) with the
    Triton attention, the CPU kernels off: the reference tokens (computed before, with PyTorch
    ops); with `triton_kernels` off the engine's modules skip them."""
    from shoal import kernels
    from shoal.model import layers

    ps = prompts(4, seed=44, lo=5, hi=30)
    models = (tiny_llama, tiny_mistral)
    want = [[ref(m.model, p) for p in ps] for m in models]
    calls = []
    for name in ("rms_norm", "rope_", "rope_store_", "silu_mul"):
        f = getattr(layers._triton_elementwise(), name)
        monkeypatch.setattr(layers._triton_elementwise(), name,
                            lambda *a, _f=f, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    monkeypatch.setattr(layers, "TRITON_ON_CPU", True)
    with kernels.disabled():
        for m, w in zip(models, want):
            outs = triton_llm(m, graphs=True, max_num_batched_tokens=16).generate(ps, GREEDY)
            assert [o.outputs[0].token_ids for o in outs] == w
        # RoPE with the cache writes in one kernel (`TritonAttention.store_rotated`)
        assert {"rms_norm", "rope_store_", "silu_mul"} <= set(calls) and "rope_" not in calls
        calls.clear()
        llm = triton_llm(tiny_llama, triton_kernels=False)
        llm.engine.runner.triton_attention = False
        assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == want[0]
        assert not calls
    layers.set_triton_ops(tiny_llama.model, True)  # (the shared fixture model, as found)


def test_rope_with_cache_writes_fills_the_cache_as_separate_writes(kern, tiny_llama, monkeypatch):
    """The engine's KV cache after the same run (chunked prompts, decode rows through the graphs'
    function) with RoPE and the cache writes in one kernel equals, bit for bit, the cache that
    rope_ and the attention's two writes fill (tokens alone could miss a wrong write)."""
    import torch

    from shoal import kernels
    from shoal.model import layers

    ps = prompts(5, seed=48, lo=5, hi=40)
    monkeypatch.setattr(layers, "TRITON_ON_CPU", True)
    caches = []
    with kernels.disabled():
        for fused in (True, False):
            if not fused:
                monkeypatch.setattr(TritonAttention, "store_rotated", None)
            llm = triton_llm(tiny_llama, graphs=True, max_num_batched_tokens=16)
            llm.generate(ps, GREEDY)
            caches.append((llm.engine.runner.cache.k.clone(), llm.engine.runner.cache.v.clone()))
    (k1, v1), (k2, v2) = caches
    assert k1.abs().sum() > 0 and torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mistral"])
def test_fused_elementwise_kernels_keep_the_models_hidden_states(kern, family, request, monkeypatch):
    """The forward with `gpu_ops` equals the PyTorch ops' to fp32 rounding (tokens alone would
    miss a wrong rotation: a tiny random model's greedy picks rarely depend on it)."""
    import torch

    from shoal import kernels
    from shoal.model import layers
    from shoal.model.fused import fuse_projections

    model = request.getfixturevalue(family).model
    fuse_projections(model)  # (as the engine runs it: q|k|v and gate|up fused, RoPE in place)
    ids = torch.tensor([prompts(1, seed=45, lo=40, hi=40)[0]])
    with kernels.disabled(), torch.no_grad():
        want = model(ids)
        monkeypatch.setattr(layers, "TRITON_ON_CPU", True)
        got = model(ids)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_adapters_through_the_triton_path(kern, setup, monkeypatch):  # noqa: F811
    """Base and five adapters mixed, through the Triton attention and fused kernels (mixed steps
    and the decode graphs' function): per row the tokens of that adapter merged into the base."""
    from shoal import kernels
    from shoal.engine.sampling_params import SamplingParams
    from shoal.model import layers
    from shoal.model.generate import generate
    from tests.engine.test_engine_lora import engine as lora_engine

    root, paths, merged = setup
    llm = lora_engine(root, paths, max_loras=4, max_cpu_loras=5)
    runner = llm.engine.runner
    runner.triton_attention, runner.cpu_decode_forward = True, False
    runner.use_decode_graphs(capture=False)
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"]
    ps = prompts(len(names), seed=46)
    stops = llm.engine.tokenizer.stop_token_ids
    want = [generate(merged[n], p, 8, stop_token_ids=stops) for p, n in zip(ps, names)]
    monkeypatch.setattr(layers, "TRITON_ON_CPU", True)
    with kernels.disabled():
        outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=8), adapter=names)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert any(lora for _, _, lora in runner.graphs.graphs)


def test_shapes_past_the_kernels_limits_keep_the_pytorch_ops(kern, tiny_llama, monkeypatch):
    """A hidden size past `rms_norm`'s limit takes PyTorch's ops (no error mid-forward); a head
    size past the attention kernels' keeps the gather path."""
    import torch

    from shoal import kernels
    from shoal.engine.triton_attention import supports
    from shoal.model import layers

    assert supports(64) and supports(256) and not supports(512)
    tk = layers._triton_elementwise()
    calls = []
    monkeypatch.setattr(tk, "rms_norm", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(tk, "MAX_HIDDEN", 32)  # the tiny model's hidden size is 64
    monkeypatch.setattr(layers, "TRITON_ON_CPU", True)
    ids = torch.tensor([prompts(1, seed=47, lo=9, hi=9)[0]])
    with kernels.disabled(), torch.no_grad():
        out = tiny_llama.model(ids)
    assert not calls and torch.isfinite(out).all()


def test_prompt_logprobs_through_chunked_triton_prefill(kern, tiny_llama):
    """Every prompt position's logprobs (echo), with prompts cut into chunks that start
    mid-sequence: the Triton path equals the CPU path to fp32 rounding."""
    ps = prompts(3, seed=48, lo=30, hi=50)
    sp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    want = make_llm(tiny_llama, max_num_batched_tokens=16).generate(ps, sp)
    got = triton_llm(tiny_llama, max_num_batched_tokens=16).generate(ps, sp)
    for w, g in zip(want, got):
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) > 30
        for a, b in zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert a[0] == b[0] and abs(a[1] - b[1]) < 1e-4 and a[2].keys() == b[2].keys()
