"""lora_dtype="int8": the batch slots hold each row of the adapters' A and B as int8 with an fp32
scale (about half a bf16 slot's bytes; a decode step with many distinct adapters reads half the
LoRA weights), computed by the CPU kernel. Per row the same greedy tokens as the base with the
adapter's rounded weights merged in; rows independent of the batch; a clear refusal where the
kernel cannot serve it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from shoal import kernels
from shoal.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.sampling_params import SamplingParams
from shoal.lora.layers import LoRALinear, quantize_rows
from shoal.model.generate import generate
from shoal.model.loader import load_dir
from tests.engine.test_engine_lora import engine, setup  # noqa: F401  (the module's adapters)
from tests.engine.test_llm_engine import STOPS, prompts
from tests.lora import merged_hf, ours_like

pytestmark = pytest.mark.skipif(not kernels.lora_int8_ready(),
                                reason="int8 LoRA slots need the CPU kernels on an AVX-512 CPU")


def rounded_copy(src, dst) -> None:
    """The PEFT adapter at src with each row of A and of B transposed rounded as int8 slots hold
    them (`quantize_rows`), saved at dst."""
    shutil.copytree(src, dst)
    tensors = load_file(f"{src}/adapter_model.safetensors")
    out = {}
    for name, w in tensors.items():
        t = w.float() if "lora_A" in name else w.float().t()  # rows: A (r, in), B.T (r, out)
        q, scale = quantize_rows(t)
        d = q.float() * scale[:, None]
        out[name] = (d if "lora_A" in name else d.t()).contiguous().to(w.dtype)
    save_file(out, f"{dst}/adapter_model.safetensors", metadata={"format": "pt"})
    json.loads(open(f"{dst}/adapter_config.json").read())  # still a PEFT adapter


def test_int8_slots_equal_the_rounded_adapters_merged(setup, tmp_path):  # noqa: F811
    root, paths, _ = setup
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    merged = {None: ours_like(hf)}
    for name, path in paths.items():
        rounded_copy(path, tmp_path / name)
        merged[name] = ours_like(merged_hf(hf, tmp_path / name))
    llm = engine(root, paths, lora_dtype="int8")
    layer = next(m for m in llm.engine.model.modules() if isinstance(m, LoRALinear))
    assert layer.lora_a_stacked.dtype == layer.lora_b_stacked.dtype == torch.int8
    assert layer.lora_a_qscale.dtype == torch.float32 and layer.lora_a_qscale.shape == layer.lora_a_stacked.shape[:2]
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"] * 3
    ps = prompts(len(names), seed=32)
    outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=10), adapter=names)
    differs = 0
    for p, name, out in zip(ps, names, outs):
        want = generate(merged[name], p, 10, stop_token_ids=STOPS)
        assert out.outputs[0].token_ids == want, name
        differs += want != generate(merged[None], p, 10, stop_token_ids=STOPS)
    assert differs > 0


def test_int8_slots_in_a_bf16_batch_keep_each_rows_bits(setup):  # noqa: F811
    """bf16 model, int8 slots (the one-call decode path reads them with their scales): each
    request's tokens and logprobs are the same alone and in a mixed batch, with two slots for
    five adapters (LRU swaps rewrite the int8 rows and their scales), and close to bf16 slots."""
    root, paths, _ = setup
    cfg = dict(model="tiny", block_size=8, num_kv_blocks=512, max_num_batched_tokens=128,
               enable_lora=True, max_loras=2, max_lora_rank=16, max_cpu_loras=8)
    llms = {}
    for dt in ("auto", "int8"):
        llms[dt] = LLM(EngineConfig(**cfg, lora_dtype=dt), loaded=load_dir(str(root / "base"), dtype="bfloat16"))
        for name, path in paths.items():
            llms[dt].add_adapter(name, path)
    names = [None, "ad0", "ad1", "ad2", "ad3", "ad4"] * 2
    ps = prompts(len(names), seed=33)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)

    def key(o):
        return o.outputs[0].token_ids, [lp for _, lp, _ in o.outputs[0].logprobs]

    llm = llms["int8"]
    mixed = [key(o) for o in llm.generate(ps, params, adapter=names)]
    assert mixed == [key(llm.generate([p], params, adapter=a)[0]) for p, a in zip(ps, names)]
    assert any(key(llm.generate([ps[i]], params)[0]) != mixed[i] for i in range(1, 6))
    ref = [key(o) for o in llms["auto"].generate(ps, params, adapter=names)]
    first = [abs(m[1][0] - r[1][0]) for m, r in zip(mixed, ref)]  # the first token's logprob
    assert max(first) < 0.1
    assert sum(m[0] == r[0] for m, r in zip(mixed, ref)) >= len(ref) - 2


def test_int8_slots_are_refused_where_the_kernel_cannot_read_them(setup):  # noqa: F811
    root, paths, _ = setup
    with pytest.raises(ValueError, match="lora_dtype: must be auto or int8"):
        EngineConfig(model="tiny", lora_dtype="fp8")
    with kernels.disabled():
        with pytest.raises(ValueError, match="lora_dtype: int8 .*no CPU kernels"):
            engine(root, paths, lora_dtype="int8")
