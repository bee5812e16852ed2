"""A GGUF file's 4-bit blocks kept as q4 groups (`shoal.model.gguf_q4`): the Q4_0, Q4_1 and Q4_K
decoders against the `gguf` package's own dequantization, and an engine on a converted Q4_0 file
serving that file's codes (re-quantizing them would give others)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from shoal.kernels import q4linear
from shoal.model import gguf_q4
from shoal.model.convert import convert_gguf
from shoal.model.loader import load_dir
from shoal.model.quant import QuantLinear
from tests.engine.test_llm_engine import make_llm
from tests.model.test_gguf import tiny_hf, write_gguf

BLOCK = {"Q4_0": (18, 32, [0]), "Q4_1": (20, 32, [0, 2]), "Q4_K": (144, 256, [0, 2])}  # bytes, values, fp16 at


def random_blocks(kind: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """(rows, bytes) of random blocks with finite, moderate fp16 scales."""
    size, per, halves = BLOCK[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // per, size), dtype=np.uint8)
    for at in halves:  # scale (and min) fields: small positive fp16 values
        raw[..., at:at + 2] = rng.uniform(0.001, 0.05, size=raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_decoders_match_ggufs_dequantization(kind):
    rows, cols = 5, 512
    raw = random_blocks(kind, rows, cols, seed=1)
    want = torch.from_numpy(gguf_dequantize(raw, Q[kind]).reshape(rows, cols).astype(np.float32))
    q, d, m = gguf_q4.DECODERS[kind](raw.reshape(-1), rows)
    q, d, m = torch.from_numpy(q.astype(np.uint8)), torch.from_numpy(d), torch.from_numpy(m)
    assert q.shape == (rows, cols) and d.shape == m.shape == (rows, cols // 32) and int(q.max()) <= 15
    got = q4linear.dequantize_q4(q, d, m)
    if kind == "Q4_K":  # the groups' d sc and dmin mn rounded once to fp16
        scale = (d.float().abs() * 15 + m.float().abs()).repeat_interleave(32, 1)
        assert ((got - want).abs() <= scale * 2**-10).all()
    else:
        assert torch.equal(got, want)


def test_engine_serves_a_q4_0_files_own_codes(tmp_path, tiny_tokenizer_dir):
    gguf_path = write_gguf(tmp_path / "tiny.Q4_0.gguf", tiny_hf("llama"), "llama", quant="Q4_0")
    codes = gguf_q4.gguf_q4_codes(gguf_path)
    assert "model.layers.0.self_attn.q_proj" in codes and "model.layers.1.mlp.down_proj" in codes
    out = convert_gguf(gguf_path, tmp_path / "converted")
    saved = gguf_q4.codes_for(str(out))  # written beside the converted weights
    assert sorted(saved.keys()) == sorted(codes.keys()) and len(saved) == len(codes)
    assert all(torch.equal(a, b) for k in codes for a, b in zip(saved[k], codes[k]))
    llm = make_llm(load_dir(str(out), dtype="bfloat16"), quantization="q4")
    layers = llm.engine.model.model.layers
    for path, layer in [("model.layers.0.self_attn.q_proj", layers[0].self_attn.q_proj),  # rows un-permuted
                        ("model.layers.1.mlp.down_proj", layers[1].mlp.down_proj)]:
        assert isinstance(layer, QuantLinear) and layer.qweight.dtype == torch.uint8
        kept = q4linear.q4unpack(layer.qweight.contiguous())
        assert all(torch.equal(a, b) for a, b in zip(kept, codes[path]))
    # re-quantizing the converted weights instead would not give the file's Q4_0 codes back
    w = q4linear.dequantize_q4(*codes["model.layers.1.mlp.down_proj"])
    assert not torch.equal(q4linear.quantize_q4(w)[0], codes["model.layers.1.mlp.down_proj"][0])
    outs = llm.generate(["Hello"], __import__("shoal.engine.sampling_params", fromlist=["x"]).SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True))
    assert len(outs[0].outputs[0].token_ids) == 4


def test_no_codes_for_a_directory_without_them(tmp_path):
    assert gguf_q4.codes_for(str(tmp_path)) == {}  # a HF directory, or a cache converted before


def test_a_failure_reading_codes_does_not_fail_the_conversion(tmp_path, monkeypatch):
    from shoal.model import convert

    def broken(path):
        raise ValueError("bad block")

    monkeypatch.setattr(convert, "gguf_q4_codes", broken)
    gguf_path = write_gguf(tmp_path / "tiny.Q4_1.gguf", tiny_hf("llama"), "llama", quant="Q4_1")
    out = convert.convert_gguf(gguf_path, tmp_path / "converted")
    assert convert.is_converted(out) and gguf_q4.codes_for(str(out)) == {}
