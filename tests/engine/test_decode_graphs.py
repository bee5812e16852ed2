"""The fixed-shape decode step that CUDA graphs capture (`shoal.engine.decode_graphs`), run
eagerly on the CPU: the reference tokens through it (padded batches, a sliding window, LoRA
engines whose base-only steps take it), padding rows writing only the scratch slot, and the
bucket grids."""

from __future__ import annotations

import pytest
import torch

from shoal.engine.decode_graphs import BATCH_GRID, batch_bucket, context_bucket
from shoal.engine.sampling_params import SamplingParams
from shoal.model.generate import generate
from shoal.model.loader import load_dir
from tests.engine.test_engine_lora import engine as lora_engine
from tests.engine.test_engine_lora import setup  # noqa: F401  (module fixture)
from tests.engine.test_llm_engine import (GREEDY, STOPS, check_abort_mid_stream, make_llm, prompts,
                                          ref)
from tests.helpers import hf_tiny_config, save_tiny_hf_dir


def graphed(llm):
    llm.engine.runner.use_decode_graphs(capture=False)
    llm.engine.speculative_tokens = 0  # (as on CUDA by default: drafts would run those steps eagerly)
    return llm


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_graph_path_gives_the_reference_tokens(family, request):
    loaded = request.getfixturevalue(family)
    ps = prompts(13, seed=5)  # 13 rows run as 16: three padding rows
    llm = graphed(make_llm(loaded))
    outs = llm.generate(ps, GREEDY)
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == ref(loaded.model, p)
    buckets = set(llm.engine.runner.graphs.graphs)
    assert (16, 64, False) in buckets or (16, 128, False) in buckets  # the padded batch, graphed
    assert all(bp in BATCH_GRID and sb % 64 == 0 and not lora for bp, sb, lora in buckets)
    assert llm.engine.block_manager.num_free_blocks == 512  # padding rows held no blocks


def test_graph_path_keeps_a_sliding_window(tmp_path, tiny_tokenizer_dir):
    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("mistral"), tmp_path / "m", tiny_tokenizer_dir)  # window 8
    loaded = load_dir(str(tmp_path / "m"), dtype="float32")
    assert loaded.config.sliding_window == 8
    ps = prompts(5, seed=6, lo=10, hi=40)
    outs = graphed(make_llm(loaded)).generate(ps, GREEDY)
    for p, out in zip(ps, outs):
        assert out.outputs[0].token_ids == ref(loaded.model, p)


def test_graph_path_with_forks_preemption_prefix_hits_and_abort(tiny_llama):
    """The engine features around a decode step keep working when decode steps take the graph
    path: n samples forking off shared prompt blocks (copy-on-write before the step), recompute
    after preemption under a tiny KV budget, prefix-cache hits, abort."""
    model = tiny_llama.model
    # n=2 at temperature 0: both samples are the reference tokens; the partial prompt block is
    # copied for the second sample before its first (graphed) decode step
    llm = graphed(make_llm(tiny_llama))
    p = prompts(1, seed=3, lo=21, hi=21)[0]
    out = llm.generate([p], SamplingParams(n=2, temperature=0.0, max_tokens=12))[0]
    assert [c.token_ids for c in out.outputs] == [ref(model, p)] * 2
    # a prefix-cache hit: the same prompt again gives the same tokens
    assert llm.generate([p], GREEDY)[0].outputs[0].token_ids == ref(model, p)
    assert llm.engine.runner.graphs.graphs
    # preemption: 16 prompts in 16 blocks of 8
    ps = prompts(16, seed=1, lo=20, hi=90)
    small = graphed(make_llm(tiny_llama, num_kv_blocks=16, max_num_batched_tokens=64))
    assert [o.outputs[0].token_ids for o in small.generate(ps, GREEDY)] == [ref(model, q) for q in ps]
    assert small.engine.block_manager.num_free_blocks == 16
    assert small.engine.runner.graphs.graphs  # decode steps between preemptions were graphed
    # abort mid-stream (after graphed decode steps) frees everything; the engine serves on
    check_abort_mid_stream(llm, steps=4)


@pytest.mark.parametrize("flights", [False, True])
def test_bf16_graph_logits_stay_bf16_with_the_fp32_copys_results(tmp_path, tiny_tokenizer_dir, monkeypatch, flights):
    """A bf16 model's graph output is bf16 (the head's dtype: no fp32 copy written and read each
    step), and the tokens, logprobs and texts are those of the fp32 copy the graphs made before
    (the sampler and the flights widen each value as it reads it), greedy and seeded rows."""
    from shoal.engine.decode_graphs import DecodeGraphs

    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("llama"), tmp_path / "m", tiny_tokenizer_dir)
    loaded = load_dir(str(tmp_path / "m"), dtype="bfloat16")
    ps = prompts(6, seed=7, lo=5, hi=30)
    params = [SamplingParams(temperature=0.0, max_tokens=10, logprobs=0),
              SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=10, logprobs=0)]
    results = []
    for widened in (False, True):
        if widened:  # the graphs' output as before: the logits copied to fp32
            forward = DecodeGraphs._forward
            monkeypatch.setattr(DecodeGraphs, "_forward", lambda self, *a: forward(self, *a).float())
        llm = graphed(make_llm(loaded, async_scheduling=flights))
        llm.engine.runner.cpu_decode_forward = False
        outs = [llm.generate(ps, sp) for sp in params]
        assert llm.engine.runner.graphs.out.dtype == (torch.float32 if widened else torch.bfloat16)
        results.append([[(c.text, c.token_ids, [lp for _, lp, _ in c.logprobs]) for o in r for c in o.outputs]
                        for r in outs])
    assert results[0] == results[1]


def test_padding_rows_write_only_the_scratch_slot(tiny_llama):
    llm = graphed(make_llm(tiny_llama, block_size=8))
    runner = llm.engine.runner
    cache = runner.cache
    k0 = cache.k.clone()
    # three rows (run as four): positions 0, 3 and 9 in blocks 1, 2 and (3, 4)
    logits = runner.graphs.run([5, 6, 7], [0, 3, 9], [[1], [2], [3, 4]])
    assert logits.shape == (3, tiny_llama.config.vocab_size)
    changed = (cache.k != k0).any(dim=-1).any(dim=1).any(dim=0)  # (slots,) written anywhere
    assert sorted(changed.nonzero().flatten().tolist()) == [8, 19, 33, cache.scratch_slot]
    # every bucket writes its logits into the one shared output buffer (rows for max_num_seqs)
    assert logits.data_ptr() == runner.graphs.out.data_ptr()
    assert runner.graphs.out.shape[0] == batch_bucket(llm.engine.config.max_num_seqs)
    with pytest.raises(ValueError, match="max_rows"):
        runner.graphs.run([5] * 40, [0] * 40, [[1]] * 40)  # more rows than max_num_seqs (32)


def test_lora_engine_graphs_base_only_steps(setup):  # noqa: F811
    root, paths, merged = setup
    llm = graphed(lora_engine(root, paths))
    names = [None, "ad0", None, "ad3", None]
    ps = prompts(len(names), seed=32)
    # adapter rows stop after 3 tokens; from then on the steps are base-only
    params = [SamplingParams(temperature=0.0, max_tokens=3 if n else 10) for n in names]
    outs = llm.generate(ps, params, adapter=names)
    for p, name, prm, out in zip(ps, names, params, outs):
        assert out.outputs[0].token_ids == generate(merged[name], p, prm.max_tokens, stop_token_ids=STOPS)
    kinds = {lora for _, _, lora in llm.engine.runner.graphs.graphs}
    assert kinds == {True, False}  # steps with adapter rows and base-only steps, graphed apart


@pytest.mark.parametrize("max_loras", [8, 2])
def test_mixed_adapter_decode_steps_through_graphs(setup, max_loras):  # noqa: F811
    """Base and five adapters (ranks 2-16, different target modules) in graphed decode steps
    give, per row, the tokens of that adapter merged into the base; with 2 slots for 5
    adapters the scheduler's admissions and LRU swaps still complete everything."""
    root, paths, merged = setup
    llm = graphed(lora_engine(root, paths, max_loras=max_loras, max_cpu_loras=max(max_loras, 5)))
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"] * 2
    ps = prompts(len(names), seed=33)
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=10), adapter=names)
    stops = llm.engine.tokenizer.stop_token_ids  # this checkpoint's: eos only
    for p, name, out in zip(ps, names, outs):
        assert out.outputs[0].token_ids == generate(merged[name], p, 10, stop_token_ids=stops), name
    assert any(lora for _, _, lora in llm.engine.runner.graphs.graphs)
    assert llm.engine.runner.lora.mapping.graph_index is None  # cleared after each step


def test_bucket_grids():
    assert [batch_bucket(n) for n in (1, 3, 13, 25, 256, 257)] == [1, 4, 16, 32, 256, 320]
    assert [context_bucket(n, 16) for n in (1, 64, 65, 512, 513, 600, 1025)] == [
        64, 64, 128, 512, 640, 640, 1280]
    assert context_bucket(10, 48) == 96  # a multiple of the block size


def test_sdpa_backends_limit_cuda_steps_to_the_efficient_kernel():
    from shoal.engine.model_runner import sdpa_backends

    flash_before = torch.backends.cuda.flash_sdp_enabled()
    with sdpa_backends(torch.device("cuda")):  # flags only: needs no GPU
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() == flash_before
    with sdpa_backends(torch.device("cpu")):  # CPU steps keep every backend
        assert torch.backends.cuda.flash_sdp_enabled() == flash_before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs,triton", [(True, True), (False, True), (True, False), (False, False)])
def test_cuda_graphs_give_the_reference_tokens(tiny_tokenizer_dir, tmp_path, graphs, triton):
    """On a GPU, fp32: captured graphs (13 rows, padded to 16) give the reference loop's
    tokens, as the eager kernels do; with the Triton attention kernels (the default) and the
    gather path; also with chunked prefill and preemption (a 16-block cache). (The same check as
    a probe on an H200, with a tiny random model of the SmolLM2 vocabulary: 13/13 in fp32 and
    bf16, graphs on and off.) Decode steps in flight (`async_scheduling`, the CUDA default) and
    landed one by one."""
    from shoal.engine.triton_attention import available

    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("llama", max_position_embeddings=512), tmp_path / "m", tiny_tokenizer_dir)
    ps = prompts(13, seed=5)
    loaded = load_dir(str(tmp_path / "m"), dtype="float32", device="cuda")
    want = [ref(loaded.model, p) for p in ps]
    for kw in ({}, {"num_kv_blocks": 16, "max_num_batched_tokens": 24}, {"async_scheduling": False}):
        llm = make_llm(loaded, device="cuda", cuda_graphs=graphs, triton_kernels=triton, **kw)
        assert (llm.engine.runner.graphs is not None) == graphs
        assert llm.engine.runner.triton_attention == (triton and available())
        assert llm.engine.async_outputs  # the CUDA defaults
        assert (llm.engine.ahead is not None) == kw.get("async_scheduling", True)
        outs = llm.generate(ps, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == want
        if graphs:
            assert llm.engine.runner.graphs.graphs  # captured
