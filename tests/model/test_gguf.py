"""GGUF loading (`shoal.model.gguf`, `shoal.model.loader.load_gguf_file`).

Tiny GGUF files are written in-process with `gguf.GGUFWriter` from tiny random Hugging Face
models, the way llama.cpp's convert_hf_to_gguf.py writes them: tensor names from gguf-py's own
name map, Llama q/k rows permuted for llama.cpp's RoPE, GPT-2 Conv1D weights transposed to
(out, in) plus an `output.weight` copy of the embedding, Q8_0 blocks for the quantized file, and
a gpt2-style BPE tokenizer in the metadata. The tests cover:

* logits of `load_gguf_file` against transformers' own GGUF loader on the same file (llama F32
  and Q8_0, qwen2 with q/k/v bias, gpt2) and against the original HF model (F32 files);
* the round trip: every tensor `load_gguf` returns equals the original HF tensor exactly, in
  particular the un-permuted Llama q_proj/k_proj weights;
* the tokenizer rebuilt from the GGUF metadata encoding like the tokenizer it was written from;
* bad files (truncated, random bytes, unsupported architecture, a missing tensor) raising
  `ModelLoadError` that names the file (and the architecture / the missing tensor).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from shoal.model.gguf import load_gguf  # noqa: E402
from shoal.model.loader import ModelLoadError, load_gguf_file  # noqa: E402
from tests.helpers import build_tiny_tokenizer, hf_model, hf_tiny_config  # noqa: E402

TOL = 1e-4
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
             "gpt2": gguf.MODEL_ARCH.GPT2}
GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


# ---- writing GGUF files the way convert_hf_to_gguf.py does -----------------------------------


def llama_cpp_permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: HF rotate-half rows -> interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tokenizer_metadata() -> dict:
    """tokens, token types, merges and bos/eos ids of the tiny byte-level BPE tokenizer."""
    tok = build_tiny_tokenizer()
    data = json.loads(tok.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for piece, idx in vocab.items():
        tokens[idx] = piece
    assert None not in tokens
    special = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {"tokens": tokens, "types": [3 if t in special else 1 for t in tokens], "merges": merges,
            "bos": tok.bos_token_id, "eos": tok.eos_token_id}


TOKENIZER = tokenizer_metadata()
VOCAB = len(TOKENIZER["tokens"])


def tiny_hf(family: str) -> transformers.PreTrainedModel:
    """A seeded tiny random HF model; its vocab is exactly the tokenizer's."""
    overrides = {"vocab_size": VOCAB, "bos_token_id": TOKENIZER["bos"], "eos_token_id": TOKENIZER["eos"]}
    if family == "gpt2":
        # transformers' GGUF reader maps gpt2.context_length to n_ctx, not n_positions, and
        # ignores feed_forward_length: keep both at GPT2Config's defaults so it can load the file.
        overrides.update(n_positions=1024, n_inner=None)
    torch.manual_seed(0)
    model = hf_model(hf_tiny_config(family, **overrides))
    with torch.no_grad():  # random, non-trivial norms and biases (HF initialises them to 1 / 0)
        for name, p in model.named_parameters():
            if p.ndim == 1:  # 1-D weights are norm scales, the rest biases
                p.copy_(float(name.endswith(".weight")) + 0.1 * torch.randn_like(p))
    return model


def gguf_tensors(model: transformers.PreTrainedModel, family: str) -> dict[str, torch.Tensor]:
    """HF state dict -> GGUF-named tensors in llama.cpp's layout (ordered as written)."""
    cfg = model.config
    name_map = gguf.get_tensor_name_map(GGUF_ARCH[family], cfg.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers, not weights
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied checkpoints do not store the head; llama.cpp reuses token_embd
        t = t.detach().float()
        if family == "llama" and name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_attention_heads)
        elif family == "llama" and name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        elif family == "gpt2" and name.endswith(GPT2_CONV1D):
            t = t.T
        new = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        out[new] = t.contiguous()
        if family == "gpt2" and new == "token_embd.weight":
            out["output.weight"] = t.clone()  # GPT-2's head is tied; llama.cpp stores a copy
    return out


def write_gguf(path, model: transformers.PreTrainedModel, family: str, *, quant: str = "F32",
               drop: tuple[str, ...] = (), arch: str | None = None) -> str:
    """Write `model` as a GGUF file (F32, or Q8_0 / Q4_0 / Q4_1 for 2-D tensors; 4-bit only where
    a row is whole groups of 32) and return its path."""
    cfg = model.config
    arch = arch or family
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if family == "gpt2":
        w.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        w.add_head_count_kv(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if family == "llama":
            w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENIZER["tokens"])
    w.add_token_types(TOKENIZER["types"])
    w.add_token_merges(TOKENIZER["merges"])
    w.add_bos_token_id(TOKENIZER["bos"])
    w.add_eos_token_id(TOKENIZER["eos"])
    for name, t in gguf_tensors(model, family).items():
        if name in drop:
            continue
        data = t.numpy().astype(np.float32)
        if quant != "F32" and data.ndim == 2 and (quant == "Q8_0" or data.shape[1] % 32 == 0):
            q = gguf.GGMLQuantizationType[quant]
            w.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)  # byte rows
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# ---- reading them back ------------------------------------------------------------------------


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def shoal_logits(path: str) -> torch.Tensor:
    with torch.no_grad():
        return load_gguf_file(path, dtype="float32", with_tokenizer=False).model.logits(input_ids())


def hf_logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits.float()


def transformers_gguf_logits(path: str) -> torch.Tensor:
    """Logits of transformers' own GGUF loader (dequantizes and un-permutes by itself)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
        attn_implementation="eager").eval()
    return hf_logits(model)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,quant", [("llama", "F32"), ("llama", "Q8_0"), ("qwen2", "F32"),
                                          ("gpt2", "F32")])
def test_logits_match_transformers_gguf_loader(tmp_path, family, quant):
    hf = tiny_hf(family)
    path = write_gguf(tmp_path / f"tiny-{family}-{quant}.gguf", hf, family, quant=quant)
    ours = shoal_logits(path)
    assert ours.shape == (2, 11, VOCAB) and ours.dtype == torch.float32
    assert max_diff(ours, transformers_gguf_logits(path)) <= TOL
    ref = hf_logits(hf)
    if quant == "F32":
        assert max_diff(ours, ref) <= TOL
    else:  # quantized: close to the original, but not equal (so Q8_0 really was written)
        assert 0 < max_diff(ours, ref) < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_tensors_round_trip_exactly(tmp_path, family):
    hf = tiny_hf(family)
    path = write_gguf(tmp_path / f"tiny-{family}.gguf", hf, family)
    config, tensors = load_gguf(path)
    state = {k: v for k, v in hf.state_dict().items()
             if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))}
    if hf.config.tie_word_embeddings and family != "gpt2":
        state.pop("lm_head.weight", None)
    assert sorted(tensors) == sorted(state)
    for name, t in tensors.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, state[name]), name
    assert config["vocab_size"] == VOCAB


def test_llama_qk_unpermute_round_trip(tmp_path):
    hf = tiny_hf("llama")
    path = write_gguf(tmp_path / "tiny-llama.gguf", hf, "llama")
    _, tensors = load_gguf(path)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    state = hf.state_dict()
    for i in range(hf.config.num_hidden_layers):
        for proj, short in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            raw = torch.from_numpy(stored[f"blk.{i}.{short}.weight"].copy()).reshape(state[name].shape)
            assert not torch.equal(raw, state[name])  # the file really holds llama.cpp's row order
            assert torch.equal(tensors[name], state[name]), name


def test_tokenizer_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "tiny-gpt2.gguf", tiny_hf("gpt2"), "gpt2")
    loaded = load_gguf_file(path, dtype="float32", with_tokenizer=True)
    text = "Hello, world! The quick brown fox."
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    assert ids == build_tiny_tokenizer().encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode())  # merges were applied, not just bytes
    assert loaded.tokenizer.decode(ids) == text
    assert loaded.tokenizer.eos_token_id == TOKENIZER["eos"]


def assert_load_error(path: str, *fragments: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_gguf_file(path, dtype="float32", with_tokenizer=False)
    msg = str(info.value)
    for fragment in (path, *fragments):
        assert fragment in msg, (fragment, msg)


def test_truncated_file(tmp_path):
    path = write_gguf(tmp_path / "truncated.gguf", tiny_hf("llama"), "llama")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    assert_load_error(path)


def test_random_bytes(tmp_path):
    path = str(tmp_path / "random.gguf")
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    assert_load_error(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", tiny_hf("llama"), "llama", arch="mamba")
    assert_load_error(path, "mamba")


def test_missing_tensor(tmp_path):
    path = write_gguf(tmp_path / "missing.gguf", tiny_hf("llama"), "llama",
                      drop=("blk.1.ffn_down.weight",))
    assert_load_error(path, "model.layers.1.mlp.down_proj.weight")
