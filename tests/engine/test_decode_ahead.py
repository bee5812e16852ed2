"""`async_scheduling` (`engine.decode_ahead`): decode steps launched before the last one lands.
Forced on here on the CPU: every stream is the synchronous engine's, token for token, with
steps actually chained; aborts, admissions and a short KV cache in the middle of flights."""

from __future__ import annotations

import pytest
import torch

from shoal import kernels
from shoal.engine.sampling_params import SamplingParams
from tests.engine.test_async_outputs import record
from tests.engine.test_async_outputs import run as run_workload
from tests.engine.test_llm_engine import check_abort_mid_stream, make_llm, prompts
from tests.kernels.triton_interp import interpreted

sample_kernel = interpreted("shoal.kernels.triton_sample")  # (a fixture: the kernel on the CPU)


LATE = 4  # the rows of `flying_workload` that may not fly, last


def flying_workload() -> list[tuple[list[int], SamplingParams]]:
    """Rows that may fly (greedy; seeded temperature, top_k, top_p; ignore_eos; stop strings and
    ids; n samples; logprobs 0) and `LATE` that may not (top logprobs, penalties, min_tokens,
    JSON mode)."""
    ps = prompts(11 + LATE, seed=41, lo=3, hi=40)
    params = [
        SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=15, top_p=0.9, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=8, max_tokens=12, top_k=5, stop=["e", "ab"]),
        SamplingParams(temperature=0.0, max_tokens=9, stop_token_ids=[5, 9], logprobs=0),
        SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=1.0, seed=10, max_tokens=16, ignore_eos=True),
    ]
    late = [SamplingParams(temperature=1.0, seed=11, max_tokens=8, logprobs=3),
            SamplingParams(temperature=0.0, max_tokens=8, presence_penalty=0.5),
            SamplingParams(temperature=1.0, seed=12, max_tokens=12, min_tokens=5, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=13, max_tokens=20, json_mode=True)]
    return [(p, params[i % len(params)]) for i, p in enumerate(ps[:11])] + list(zip(ps[11:], late))


def drive(llm, work, add_after: int | None = None) -> dict:
    """Per request its streamed deltas and final outputs; with `add_after`, the last LATE requests
    join after that many steps (while others are in flight)."""
    eng = llm.engine
    first = work if add_after is None else work[:-LATE]
    for i, (p, sp) in enumerate(first):
        eng.add_request(f"w{i}", p, sp)
    seen: dict[str, dict] = {}
    step = 0
    while eng.has_unfinished() or (add_after is not None and step <= add_after):
        step += 1
        if step == add_after:
            for i, (p, sp) in enumerate(work[-LATE:], start=len(first)):
                eng.add_request(f"w{i}", p, sp)
        for out in eng.step():
            record(seen, out)
    return seen


def check_idle(eng) -> None:
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng.requests and not eng.scheduler.running and not eng.scheduler.waiting


@pytest.mark.parametrize("add_after", [None, 5])
def test_flights_stream_what_the_synchronous_engine_streams(tiny_llama, add_after):
    """Without `add_after` the rows that may fly alone; with it the LATE that may not join in the
    middle of flights (which land, then the steps run synchronously until those are done)."""
    work = flying_workload()
    if add_after is None:
        work = work[:-LATE]
    want = drive(make_llm(tiny_llama, max_num_batched_tokens=64), work, add_after)
    llm = make_llm(tiny_llama, max_num_batched_tokens=64, async_scheduling=True)
    got = drive(llm, work, add_after)
    assert got == want  # every delta, text, token, logprob, finish and stop reason
    assert len(got) == len(work) and all("final" in v for v in got.values())
    ahead = llm.engine.ahead
    assert ahead.launches >= (1 if add_after is None else 2) and ahead.chains >= 5  # steps flew, chained
    check_idle(llm.engine)


def test_flights_through_the_graphs_step_stream_what_the_synchronous_engine_streams(tiny_llama):
    """The GPU's decode path (the decode graphs' step, run eagerly on the CPU) with steps in
    flight: every stream as the synchronous engine's through the same step."""
    work = flying_workload()[:-LATE]
    streams = []
    for flights in (False, True):
        llm = make_llm(tiny_llama, max_num_batched_tokens=64, async_scheduling=flights)
        llm.engine.runner.cpu_decode_forward = False
        llm.engine.runner.use_decode_graphs(capture=False)
        streams.append(drive(llm, work))
        check_idle(llm.engine)
        assert llm.engine.runner.graphs.graphs  # (decode steps went through the graphs' step)
    assert llm.engine.ahead.chains >= 5
    # (the graphs' step keeps a finished row's place in a chained batch: other row counts, so
    # fp32 products other last bits, as on a GPU; tokens and texts exact, logprobs to 1e-5)
    assert close(streams[0], streams[1]) and len(streams[1]) == len(work)


def close(a, b) -> bool:
    """a == b, floats within 1e-5 (nested dicts, lists, tuples)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-5 * max(1.0, abs(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


def test_the_mixed_workload_of_deferred_outputs_too(tiny_llama):
    """Best_of > n, stop strings, top logprobs, min_tokens: the same streams (most rows land
    synchronously), with and without deferred outputs."""
    want, _ = run_workload(make_llm(tiny_llama, max_num_batched_tokens=64))
    for deferred in (False, True):
        llm = make_llm(tiny_llama, max_num_batched_tokens=64, async_scheduling=True, async_outputs=deferred)
        got, _ = run_workload(llm)
        assert got == want
        check_idle(llm.engine)


def test_a_short_kv_cache_lands_and_preempts_as_the_synchronous_engine(tiny_llama):
    """24 blocks of 8 for 8 requests of up to 40 + 30 tokens: chains stop where a row would need
    a block the cache lacks, the scheduler preempts; the same tokens."""
    ps = prompts(8, seed=42, lo=10, hi=40)
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    kw = dict(num_kv_blocks=24, max_num_batched_tokens=64)
    want = [o.outputs[0].token_ids for o in make_llm(tiny_llama, **kw).generate(ps, sp)]
    llm = make_llm(tiny_llama, async_scheduling=True, **kw)
    assert [o.outputs[0].token_ids for o in llm.generate(ps, sp)] == want
    assert llm.engine.ahead.chains > 0
    check_idle(llm.engine)


def test_abort_in_flight_frees_every_block_and_serves_on(tiny_llama):
    llm = make_llm(tiny_llama, async_scheduling=True)
    check_abort_mid_stream(llm, steps=4)
    eng = llm.engine
    eng.add_request("a", prompts(1, seed=43)[0], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    eng.add_request("b", prompts(1, seed=44)[0], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.ahead.flight is not None  # "a" and "b" decode in flight
    assert eng.abort("a")
    rest = []
    while eng.has_unfinished():
        rest += eng.step()
    assert {o.request_id for o in rest} == {"b"} and rest[-1].finished
    assert len(rest[-1].outputs[0].token_ids) == 6
    check_idle(eng)


@pytest.mark.parametrize("fused", [None, "greedy", "both"])
def test_device_sampling_gives_the_synchronous_tokens(tiny_llama, fused, monkeypatch, request):
    """The CUDA path's sampling (PyTorch ops on the logits' device, the tokens copied back behind
    an event) run on the CPU: with the CPU kernels off the synchronous sampler runs the same ops,
    so the same tokens; logprobs to rounding (a batched logsumexp against one a row). `fused`:
    with the Triton kernels (`kernels.triton_sample`, under the interpreter) for the greedy rows
    (the CUDA default), and with "both" on both sides for the sampled rows' draws too."""
    from shoal.engine import decode_ahead, device_draw

    used, drew = [], []
    if fused:  # (both sides draw through the kernel: the synchronous sampler's rows too)
        kern = request.getfixturevalue("sample_kernel")
        monkeypatch.setattr(decode_ahead, "triton_sampling", lambda x: used.append(x.shape) or kern)
        monkeypatch.setattr(device_draw, "triton_sampling", lambda x: drew.append(x.shape) or kern)
    work = [w for w in flying_workload() if w[1].logprobs is None and not (w[1].presence_penalty or w[1].json_mode)]
    with kernels.disabled():
        ref = make_llm(tiny_llama, max_num_batched_tokens=64)
        llm = make_llm(tiny_llama, max_num_batched_tokens=64, async_scheduling=True)
        llm.engine.ahead.device_ops = True
        ref.engine.sampler.triton_draw = llm.engine.sampler.triton_draw = fused == "both"  # (off by default)
        want = drive(ref, work)
        got = drive(llm, work)
    assert llm.engine.ahead.chains >= 10
    assert len(used) >= 10 if fused else not used
    assert len(drew) >= 10 if fused == "both" else not drew
    assert got.keys() == want.keys()
    for rid, w in want.items():
        g = got[rid]
        for (gi, gt, gtoks, gfin, gstop, gcum, _), (wi, wt, wtoks, wfin, wstop, wcum, _) in zip(g["final"], w["final"]):
            assert (gi, gt, gtoks, gfin, gstop) == (wi, wt, wtoks, wfin, wstop), rid
            assert gcum == pytest.approx(wcum, abs=1e-4)
    check_idle(llm.engine)


def test_json_rows_land_before_their_next_draw(tiny_llama):
    """A JSON-mode row's mask follows its tokens one at a time, so it never flies: with device
    sampling (the CUDA path, which applies no mask) beside rows that fly, the streams are the
    synchronous engine's and the JSON row's text a prefix of one object."""
    from shoal.engine.json_guide import START, feed

    work = flying_workload()[:6] + [(prompts(1, seed=77, lo=9, hi=9)[0],
                                     SamplingParams(temperature=1.0, seed=3, max_tokens=30, json_mode=True))]
    with kernels.disabled():
        ref = make_llm(tiny_llama, max_num_batched_tokens=64)
        llm = make_llm(tiny_llama, max_num_batched_tokens=64, async_scheduling=True)
        llm.engine.ahead.device_ops = True
        want, got = drive(ref, work), drive(llm, work)
    assert got == want
    text = want[f"w{len(work) - 1}"]["final"][0][1]
    assert text.lstrip().startswith("{") and feed(START, text.encode())
    check_idle(llm.engine)


def test_feed_reads_rows_from_the_tokens_in_flight():
    from shoal.engine.decode_ahead import Feed

    class S:
        def __init__(self, i):
            self.seq_id = i

    tokens = torch.tensor([40, 41, 42, 43])
    feed = Feed(tokens, {10: 0, 11: 1, 12: 2})
    ids = torch.zeros(3, dtype=torch.long)
    feed.apply(ids, *feed.pairs(range(3), [S(10), S(11), S(12)]))  # rows in order: one copy
    assert ids.tolist() == [40, 41, 42]
    feed = Feed(tokens, {10: 3, 12: 1})
    ids = torch.full((4,), 7, dtype=torch.long)
    dst, src = feed.pairs([0, 2, 3], [S(12), S(11), S(10)])
    assert (dst, src) == ([0, 3], [1, 3])
    feed.apply(ids, dst, src)
    assert ids.tolist() == [41, 7, 7, 43]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("graphs", [True, False])
def test_flights_on_a_gpu_give_the_synchronous_tokens(tiny_tokenizer_dir, tmp_path, graphs):
    """On a GPU (fp32, tiny model): greedy rows the reference loop's tokens, seeded rows the
    synchronous engine's, through chained steps (graphs fed from the step in flight), also with
    a short KV cache."""
    from shoal.model.loader import load_dir
    from tests.engine.test_llm_engine import GREEDY, ref
    from tests.helpers import hf_tiny_config, save_tiny_hf_dir

    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("llama", max_position_embeddings=512), tmp_path / "m", tiny_tokenizer_dir)
    loaded = load_dir(str(tmp_path / "m"), dtype="float32", device="cuda")
    ps = prompts(13, seed=46)
    want = [ref(loaded.model, p) for p in ps]
    work = [w for w in flying_workload() if w[1].logprobs is None and not (w[1].presence_penalty or w[1].json_mode)]
    seeded = drive(make_llm(loaded, device="cuda", cuda_graphs=graphs, max_num_batched_tokens=64,
                            async_scheduling=False), work)
    for kw in ({}, {"num_kv_blocks": 16, "max_num_batched_tokens": 24}):
        llm = make_llm(loaded, device="cuda", cuda_graphs=graphs, async_scheduling=True, **kw)
        assert llm.engine.ahead.device_ops
        assert [o.outputs[0].token_ids for o in llm.generate(ps, GREEDY)] == want
        assert llm.engine.ahead.chains > 0
        check_idle(llm.engine)
    llm = make_llm(loaded, device="cuda", cuda_graphs=graphs, async_scheduling=True, max_num_batched_tokens=64)
    got = drive(llm, work)
    for rid, w in seeded.items():
        assert [c[:5] for c in got[rid]["final"]] == [c[:5] for c in w["final"]], rid


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launching_a_step_on_a_gpu_never_waits_for_the_device():
    """`launch_sample` of greedy, ignore_eos and seeded rows (and of greedy rows alone: the fused
    kernel's whole answer) queues its work and its copy without synchronizing (a synchronizing
    call raises under the sync debug mode), and the tokens it lands equal the synchronous
    sampler's, the logprobs to rounding."""
    from shoal.engine.decode_ahead import launch_sample
    from shoal.engine.sampler import Sampler
    from shoal.engine.sequence import Sequence

    for greedy_only in (False, True):
        sampler = Sampler([0, 2])
        seqs = [Sequence(f"s{i}", [5, 6, 7], SamplingParams(temperature=0.0 if i % 2 or greedy_only else 0.8,
                                                            seed=i, ignore_eos=i % 3 == 0, max_tokens=4))
                for i in range(6)]
        logits = torch.randn(6, 64, generator=torch.Generator().manual_seed(3)).cuda()
        logits[:, 0] += 8.0  # (eos the argmax: the ignore_eos rows must skip it)
        host = torch.empty(12, dtype=torch.float64).pin_memory()
        want, want_lps, _ = Sampler([0, 2]).sample(logits.clone(), seqs)
        for s in seqs:
            s.generator = None  # (the same draws again)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            launched = launch_sample(sampler, logits, seqs, device_ops=True, host=host)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        toks, lps = launched.result()
        assert toks == want, greedy_only
        assert lps == pytest.approx(want_lps, abs=1e-5)


@pytest.mark.parametrize("invariant", [True, False])
def test_flights_register_the_prefix_blocks_the_synchronous_engine_does(tiny_llama, invariant):
    """A second turn (the first's prompt and answer, and more) after a first run in flight hits
    the same cached blocks as after a synchronous run, and gives the same tokens; without the
    batch-invariant mode blocks that decode steps filled are reused too."""
    p = prompts(1, seed=47, lo=21, hi=21)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    seen = []
    for flights in (False, True):
        llm = make_llm(tiny_llama, async_scheduling=flights, batch_invariant=invariant)
        first = llm.generate([p], sp)[0].outputs[0].token_ids
        second = llm.generate([p + first + [5, 6]], SamplingParams(temperature=0.0, max_tokens=8))[0]
        seen.append((first, second.num_cached_tokens, second.outputs[0].token_ids))
        if flights:
            assert llm.engine.ahead.chains > 20
    assert seen[0] == seen[1]
    assert seen[0][1] >= (16 if invariant else 48)  # whole blocks of 8: the prompt's, then the answer's


def test_flights_are_a_cuda_default_and_off_on_the_cpu(tiny_llama):
    """`async_scheduling=None` (the default) resolves by device: off on the CPU (the forward and
    the bookkeeping share the cores); on CUDA, asserted by the GPU tests (test_decode_graphs)."""
    assert make_llm(tiny_llama).engine.ahead is None
    assert make_llm(tiny_llama, async_scheduling=True).engine.ahead is not None
    from shoal.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.async_scheduling is None
    assert build_parser().parse_args(["serve", "--no-async-scheduling"]).async_scheduling is False


@pytest.mark.parametrize("kw", [{}, {"num_kv_blocks": 14}], ids=["roomy", "short-kv"])
def test_steps_in_flight_admit_and_chunk_prompts_as_the_synchronous_engine(tiny_llama, kw):
    """A queue longer than the batch (max_num_seqs 6), prompts chunked by a 40-token budget,
    requests joining mid-run and a second turn on a first one's prompt (prefix hits): the next
    step is planned while one flies, its admissions and prompt chunks included, and every stream
    is the synchronous engine's, delta for delta; with a short KV cache the plans that would not
    fit land first (and preempt) as before."""
    ps = prompts(12, seed=52, lo=5, hi=70)
    ps[11] = ps[2] + ps[11][:9]  # (shares ps[2]'s leading blocks)
    kinds = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
             SamplingParams(temperature=1.0, seed=21, max_tokens=11, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=22, max_tokens=13, stop=["e"]),
             SamplingParams(temperature=0.0, max_tokens=9, stop_token_ids=[5, 9])]
    work = [(p, kinds[i % len(kinds)]) for i, p in enumerate(ps)]
    cfg = dict(max_num_batched_tokens=40, max_num_seqs=6, **kw)
    want = drive(make_llm(tiny_llama, **cfg), work, add_after=4)
    llm = make_llm(tiny_llama, async_scheduling=True, **cfg)
    preempted = []
    sch = llm.engine.scheduler
    preempt = sch.preempt
    sch.preempt = lambda seq: preempted.append(seq.seq_id) or preempt(seq)
    got = drive(llm, work, add_after=4)
    assert got == want
    ahead = llm.engine.ahead
    assert ahead.mixed >= 3 and ahead.chains >= 10, (ahead.mixed, ahead.chains)
    assert bool(preempted) == ("num_kv_blocks" in kw)
    check_idle(llm.engine)
