"""The flat CPU decode forward (`shoal.engine.cpu_decode`) gives the module path's bits, and
serves only the steps it is meant for."""

from __future__ import annotations

import pytest
import torch

from shoal.engine.sampling_params import SamplingParams
from tests.engine.test_engine_lora import engine, setup  # noqa: F401  (fixture)
from tests.engine.test_llm_engine import make_llm, prompts


def _wide_llama(tmp_path, tiny_tokenizer_dir, dtype, family="llama"):
    from shoal.model.loader import load_dir
    from tests.helpers import hf_tiny_config, save_tiny_hf_dir

    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config(family, intermediate_size=1536, max_position_embeddings=512),
                     tmp_path / "wide", tiny_tokenizer_dir)
    return load_dir(str(tmp_path / "wide"), dtype=dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_flat_forward_gives_the_module_paths_bits(tmp_path, tiny_tokenizer_dir, dtype, monkeypatch):
    """Same tokens and bit-identical logprobs with the flat forward on and off, for 12 mixed
    requests (decode-only steps take it; steps with a prefill chunk take the modules)."""
    from shoal.engine import cpu_decode

    loaded = _wide_llama(tmp_path, tiny_tokenizer_dir, dtype)
    ps = prompts(12, seed=7, lo=4, hi=90)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=11, ignore_eos=True, logprobs=2)
    calls = []
    real = cpu_decode.CPUDecodeForward.__call__
    monkeypatch.setattr(cpu_decode.CPUDecodeForward, "__call__",
                        lambda self, *a: calls.append(a[0].numel()) or real(self, *a))
    runs = []
    for on in (True, False):
        llm = make_llm(loaded, max_num_batched_tokens=64)
        llm.engine.runner.cpu_decode_forward = on
        runs.append([o.outputs[0] for o in llm.generate(ps, params)])
    assert calls and max(calls) > 1  # the flat forward served decode steps, batched ones too
    for fast, slow in zip(*runs):
        assert fast.token_ids == slow.token_ids
        assert [lp for _, lp, _ in fast.logprobs] == [lp for _, lp, _ in slow.logprobs]


def test_steps_with_adapter_rows_take_the_modules(setup, monkeypatch):
    """LoRA enabled: base-only decode steps take the flat forward, steps with an adapter row the
    module path (where the LoRA layers add their deltas; their tokens are checked against merged
    weights in test_engine_lora)."""
    from shoal.engine import cpu_decode

    root, paths, _ = setup
    llm = engine(root, {"ad3": paths["ad3"]})
    seen = []
    real = cpu_decode.CPUDecodeForward.__call__
    monkeypatch.setattr(cpu_decode.CPUDecodeForward, "__call__",
                        lambda self, *a: seen.append(1) or real(self, *a))
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm.generate([prompts(1, seed=3)[0]], greedy, adapter="ad3")
    assert not seen
    llm.generate([prompts(1, seed=3)[0]], greedy)
    assert len(seen) == 5  # every decode step of the base-only request


@pytest.mark.skipif(not __import__("shoal.kernels.qlinear", fromlist=["x"]).packed_ready(),
                    reason="the one-call path needs packed products (AVX-512)")
@pytest.mark.parametrize("quantization,family", [(None, "llama"), ("int8", "llama"), ("q4", "llama"),
                                                 (None, "qwen2"), ("q4", "qwen2")])
def test_one_call_path_gives_the_python_paths_bits(tmp_path, tiny_tokenizer_dir, monkeypatch, quantization,
                                                   family):
    """bf16 on packed products (bf16, int8 or q4 weights; Llama, and Qwen2 with its q|k|v bias): all
    blocks in one C++ call give the per-layer Python path's tokens and logprobs bit for bit (12 mixed
    requests, batched decode steps among them)."""
    from shoal.engine import cpu_decode

    loaded = _wide_llama(tmp_path, tiny_tokenizer_dir, "bfloat16", family)
    assert (loaded.model.config.attention_bias) == (family == "qwen2")
    ps = prompts(12, seed=8, lo=4, hi=90)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=12, ignore_eos=True, logprobs=2)
    calls = []
    real_call, real_fits = cpu_decode.CPUDecodeForward._native_call, cpu_decode.CPUDecodeForward._native_fits
    monkeypatch.setattr(cpu_decode.CPUDecodeForward, "_native_call",
                        lambda self, h, *a: calls.append(h.shape[0]) or real_call(self, h, *a))
    runs = []
    for on in (True, False):
        monkeypatch.setattr(cpu_decode.CPUDecodeForward, "_native_fits",
                            (lambda self, h, ctx: real_fits(self, h, ctx)) if on else (lambda self, h, ctx: False))
        llm = make_llm(loaded, max_num_batched_tokens=64, quantization=quantization)
        before = len(calls)
        runs.append([o.outputs[0] for o in llm.generate(ps, params)])
        assert (len(calls) > before) == on
        assert llm.engine.runner._cpu_decode.kind == {"int8": 0, None: 1, "q4": 2}[quantization]
    assert max(calls) > 1
    for fast, slow in zip(*runs):
        assert fast.token_ids == slow.token_ids
        assert [lp for _, lp, _ in fast.logprobs] == [lp for _, lp, _ in slow.logprobs]


@pytest.mark.skipif(not __import__("shoal.kernels.qlinear", fromlist=["x"]).packed_ready(),
                    reason="the one-call path needs packed products (AVX-512)")
@pytest.mark.parametrize("quantization", [None, "int8", "q4"])
def test_one_call_path_adds_the_lora_layers_deltas_bit_for_bit(setup, monkeypatch, quantization):
    """bf16 on packed products (bf16, int8 or q4 weights), base and 5 adapters mixed: decode steps with adapter
    rows through the one call (LoRA deltas added in C++ after each product) give the module
    path's tokens and logprobs bit for bit."""
    from shoal.config import EngineConfig
    from shoal.engine import cpu_decode
    from shoal.engine.llm import LLM
    from shoal.model.loader import load_dir

    root, paths, _ = setup
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"] * 2
    ps = prompts(len(names), seed=32)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
    seen = []
    real_fits = cpu_decode.CPUDecodeForward._native_fits
    runs = []
    for on in (True, False):
        def fits(self, h, ctx, on=on):
            ok = on and real_fits(self, h, ctx)
            seen.append(ok and self.mapping.active)
            return ok
        monkeypatch.setattr(cpu_decode.CPUDecodeForward, "_native_fits", fits)
        cfg = EngineConfig(model="tiny", block_size=8, num_kv_blocks=512, max_num_batched_tokens=128,
                           enable_lora=True, max_loras=8, max_lora_rank=16, max_cpu_loras=8,
                           quantization=quantization)
        llm = LLM(cfg, loaded=load_dir(str(root / "base"), dtype="bfloat16"))
        for name, path in paths.items():
            llm.add_adapter(name, path)
        runs.append([o.outputs[0] for o in llm.generate(ps, params, adapter=names)])
        if on:
            assert any(seen)  # adapter decode steps took the one call
    for fast, slow in zip(*runs):
        assert fast.token_ids == slow.token_ids
        assert [lp for _, lp, _ in fast.logprobs] == [lp for _, lp, _ in slow.logprobs]


@pytest.mark.skipif(not __import__("shoal.kernels.qlinear", fromlist=["x"]).packed_ready(),
                    reason="the one-call path needs packed products (AVX-512)")
def test_decode_profile_times_the_one_call_path_while_on(tmp_path, tiny_tokenizer_dir):
    """`kernels.probes.decode_profile` (bench/decode_breakdown.py): while on, every one-call decode is
    counted and its kernels' time lands in their stages (no LoRA stage without adapters); off, the
    sums stay as they were."""
    from shoal.kernels import probes as ops

    loaded = _wide_llama(tmp_path, tiny_tokenizer_dir, "bfloat16")
    llm = make_llm(loaded, max_num_batched_tokens=64)
    ps = prompts(6, seed=9, lo=4, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm.generate(ps, params)  # warm-up
    ops.decode_profile(True)
    llm.generate(ps, params)
    on = ops.decode_profile(False)
    assert set(on) == {*ops.DECODE_STAGES, "calls"}
    assert on["calls"] >= 5  # the decode steps after each prompt's first token
    for stage in ("norm", "q|k|v", "RoPE", "cache write", "attention", "o", "MLP norm", "gate|up", "SiLU", "down",
                  "final norm"):
        assert on[stage] > 0, stage
    assert all(on[s] == 0 for s in ops.DECODE_STAGES if "LoRA" in s)
    llm.generate(ps, params)
    assert ops.decode_profile(False) == on
