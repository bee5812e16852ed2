"""Test helpers: tiny Hugging Face configs of each family and a tiny BPE tokenizer."""

from __future__ import annotations

import os

import transformers

TINY_VOCAB = 320
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Der schnelle braune Fuchs springt.",
    "Hello, world! How are you today?", "Translate English to German: cheese => Käse",
    "Review: great movie\nLabel: <POS>", "Review: boring plot\nLabel: <NEG>",
] * 20


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process (no download), with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    return fast


def hf_tiny_config(family: str, **overrides):
    """A 2-layer, hidden-64 transformers config of the named family."""
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=256, rope_theta=10000.0,
            tie_word_embeddings=False, **common)
    elif family == "llama3":
        cfg = transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            intermediate_size=96, max_position_embeddings=512, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
            tie_word_embeddings=True, **common)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=256, tie_word_embeddings=True, **common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=256, sliding_window=8, **common)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def hf_model(config):
    """A random-weight HF causal LM in eval mode, eager attention (the plain reference)."""
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def save_tiny_hf_dir(config, path, tokenizer_dir: str | None = None):
    """Save a random HF model (safetensors) and, optionally, the tiny tokenizer to `path`."""
    model = hf_model(config)
    model.save_pretrained(path)
    if tokenizer_dir:
        transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(path)
    return model


def file_size(path) -> int:
    return os.path.getsize(path)
