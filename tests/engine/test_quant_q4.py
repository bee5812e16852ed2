"""quantization="q4" through the engine: 4-bit decoder layers and an int8 output layer, a fifth of
fp32's linear-weight bytes, logits near fp32's, rows that keep their bits in any batch, a part
that cannot be packed (left unfused), bad values, the CLI, the real model's answer."""

from __future__ import annotations

import pytest
import torch

from shoal.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.sampling_params import SamplingParams
from shoal.model.fused import fuse_projections
from shoal.model.layers import Linear
from shoal.model.quant import QuantEmbedding, QuantLinear, quantize_model
from tests.engine.test_llm_engine import make_llm, prompts
from tests.engine.test_quant import fresh, linear_weight_bytes, tiny_tied  # noqa: F401 (fixture)


def kinds(model: torch.nn.Module) -> dict[str, str]:
    return {n: ("q4" if m.qweight.dtype == torch.uint8 else "int8")
            for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_engine_q4_layers_bytes_and_logits(tiny_llama):
    ref = tiny_llama.model
    llm = make_llm(fresh(tiny_llama), quantization="q4")
    model = llm.engine.model
    assert not any(type(m) in (torch.nn.Linear, Linear) for m in model.modules())
    k = kinds(model)
    assert k.pop("lm_head") == "int8"  # the output layer stays int8 (untied here)
    assert set(k.values()) == {"q4"}  # every decoder layer, fused ones included
    ratio = linear_weight_bytes(model) / linear_weight_bytes(ref)
    assert 0.15 < ratio < 0.22, ratio  # 5 bits of 32 for the decoder, 8 for lm_head
    ids = torch.tensor(prompts(4, seed=60, lo=40, hi=40))
    with torch.inference_mode():
        want, got = ref.logits(ids), model.logits(ids)
    rel = (got - want).norm() / want.norm()  # measured: 10.3% (4 bits on random weights)
    assert rel < 0.15, rel
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8  # measured: 0.92


def test_engine_q4_rows_keep_their_bits_in_any_batch(tiny_llama):
    """Greedy tokens and logprobs, bit for bit, for 12 prompts alone and together (chunked prefill
    mixing them): the q4 products quantize each row's activations from that row alone."""
    llm = make_llm(fresh(tiny_llama), quantization="q4", max_num_batched_tokens=64)
    ps = prompts(12, seed=61)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0)

    def key(o):
        c = o.outputs[0]
        return c.token_ids, c.logprobs

    together = [key(o) for o in llm.generate(ps, params)]
    assert together == [key(llm.generate([p], params)[0]) for p in ps]


def test_tied_head_stays_int8_and_feeds_the_embedding(tiny_tied):  # noqa: F811
    model = fresh(tiny_tied).model
    assert quantize_model(model, "q4") == 2 * 7 + 1
    k = kinds(model)
    assert k.pop("lm_head") == "int8" and set(k.values()) == {"q4"}
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.qweight is model.lm_head.qweight


def test_a_part_that_does_not_fit_stays_unfused(tiny_llama):
    """k_proj int8 beside q4 q_proj and v_proj (as where a part's width is not a multiple of 16):
    q/k/v are left as three products; the MLP still fuses."""
    model = fresh(tiny_llama).model
    quantize_model(model, "q4")
    at = model.model.layers[0].self_attn
    plain = Linear(at.k_proj.in_features, at.k_proj.out_features, bias=False)
    plain.weight = torch.nn.Parameter(at.k_proj.plain_weight())
    at.k_proj = QuantLinear.from_linear(plain, "int8")
    fuse_projections(model)
    assert at.fused_qkv is None and model.model.layers[0].mlp.fused_gate_up is not None
    assert model.model.layers[1].self_attn.fused_qkv is not None
    with torch.inference_mode():
        assert torch.isfinite(model.logits(torch.tensor([prompts(1, seed=62)[0]]))).all()


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="quantization: must be None, int8 or q4"):
        EngineConfig(quantization="q3")
    with pytest.raises(ValueError, match="quantization: q4 runs on CPU only"):
        EngineConfig(quantization="q4", device="cuda")


def test_cli_takes_q4():
    from shoal.cli import build_parser

    assert build_parser().parse_args(["serve", "--quantization", "q4"]).quantization == "q4"


@pytest.mark.real_model
def test_real_model_q4_holds_the_gguf_codes_and_answers(default_home, monkeypatch):
    """The default model's GGUF stores its layers in Q4_1: quantizing the converted model gives back
    those codes, scales and minimums exactly, so q4 serves the file's own weights."""
    import numpy as np
    from gguf import GGUFReader

    from shoal.kernels import q4linear
    from shoal.model.registry import default_gguf_path

    monkeypatch.setenv("SHOAL_HOME", str(default_home))
    llm = LLM(EngineConfig(quantization="q4", kv_cache_memory=16 * 2**20))
    down = llm.engine.model.model.layers[3].mlp.down_proj  # (576, 1536), a view of no fused layer
    q, d, m = q4linear.q4unpack(down.qweight)
    t = next(t for t in GGUFReader(default_gguf_path()).tensors if t.name == "blk.3.ffn_down.weight")
    blk = np.array(t.data).reshape(-1, 20)  # Q4_1 block: d, m (fp16), 16 bytes of nibbles
    codes = np.concatenate([blk[:, 4:] & 15, blk[:, 4:] >> 4], axis=1)  # elements 0-15 low, 16-31 high
    assert torch.equal(q, torch.from_numpy(codes.reshape(576, 1536)))
    assert torch.equal(d, torch.from_numpy(blk[:, 0:2].copy().view(np.float16).reshape(576, 48)))
    assert torch.equal(m, torch.from_numpy(blk[:, 2:4].copy().view(np.float16).reshape(576, 48)))
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=4))
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "mistral"])
def test_q4_for_every_family(tmp_path, tiny_tokenizer_dir, family):
    """q4 on Qwen2 (q|k|v biases), GPT-2 (fused c_attn, biases, GELU) and Mistral (sliding window):
    4-bit layers wherever the shape fits, greedy tokens and logprobs the same alone as in a batch."""
    from shoal.model.loader import load_dir
    from tests.helpers import hf_tiny_config, save_tiny_hf_dir

    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config(family), tmp_path / family, tiny_tokenizer_dir)
    llm = make_llm(load_dir(str(tmp_path / family), dtype="bfloat16"), quantization="q4")
    assert "q4" in kinds(llm.engine.model).values()
    ps = prompts(6, seed=63)
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=0, ignore_eos=True)

    def key(o):
        return o.outputs[0].token_ids, [lp for _, lp, _ in o.outputs[0].logprobs]

    together = [key(o) for o in llm.generate(ps, params)]
    assert all(len(t) == 6 for t, _ in together)
    assert together == [key(llm.generate([p], params)[0]) for p in ps]
