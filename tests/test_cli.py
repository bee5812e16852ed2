"""The `shoal` command: generate and base-models, with one-line errors and non-zero exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from shoal.cli import main
from tests.helpers import hf_tiny_config, save_tiny_hf_dir


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_base_models_add_list_rm(home, tmp_path, tiny_tokenizer_dir, capsys):
    save_tiny_hf_dir(hf_tiny_config("gpt2"), tmp_path / "g", tiny_tokenizer_dir)
    assert main(["base-models", "add", "tiny-gpt2", str(tmp_path / "g")]) == 0
    assert "added tiny-gpt2: gpt2" in capsys.readouterr().out
    assert main(["base-models"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "tiny-gpt2" in out and "gpt2" in out
    assert main(["base-models", "rm", "tiny-gpt2"]) == 0
    capsys.readouterr()
    main(["base-models", "list"])
    assert "tiny-gpt2" not in capsys.readouterr().out


def test_generate_with_a_path_is_seeded(home, tmp_path, tiny_tokenizer_dir, capsys):
    torch.manual_seed(0)
    save_tiny_hf_dir(hf_tiny_config("llama"), tmp_path / "m", tiny_tokenizer_dir)
    args = ["generate", "Hello", "--model", str(tmp_path / "m"), "--max-tokens", "8",
            "--temperature", "1.0", "--seed", "3", "--ignore-eos"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert first.out.startswith("Hello")
    assert "8 generated tokens" in first.err
    assert main(args) == 0
    assert capsys.readouterr().out == first.out


def test_unknown_model_is_one_line_and_exit_2(home, capsys):
    assert main(["generate", "hi", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shoal: error:") and "no-such-model" in err[0]


def test_bad_dtype_is_one_line(home, tmp_path, tiny_tokenizer_dir, capsys):
    save_tiny_hf_dir(hf_tiny_config("llama"), tmp_path / "m", tiny_tokenizer_dir)
    assert main(["generate", "hi", "--model", str(tmp_path / "m"), "--dtype", "int3"]) == 2
    assert "dtype" in capsys.readouterr().err


@pytest.mark.real_model
def test_console_script_generates_with_the_default_model(default_home):
    env = {**os.environ, "SHOAL_HOME": str(default_home)}
    exe = os.path.join(os.path.dirname(sys.executable), "shoal")
    # (not France: for this model "The capital..." and "L'Étoile..." are a 0.08-nat near-tie in fp32,
    # which bf16 rounding decides either way from one CPU to the next; Germany's answer leads by
    # 0.6-1.0 nats in bf16, int8 and q4)
    proc = subprocess.run([exe, "generate", "What is the capital of Germany?", "--chat",
                           "--max-tokens", "12"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Berlin" in proc.stdout


def test_serve_refuses_a_public_host_without_keys(home, capsys):
    assert main(["serve", "--host", "0.0.0.0", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0" in err and "host" in err


def test_serve_names_a_bad_lora_dtype(home, capsys, monkeypatch):
    monkeypatch.setenv("SHOAL_LORA_DTYPE", "fp8")  # the variable reaches the engine's config
    assert main(["serve", "--model", "no-such-model"]) == 2
    assert "lora_dtype: must be auto or int8" in capsys.readouterr().err
    # --speculative-tokens reaches the engine's config too
    monkeypatch.delenv("SHOAL_LORA_DTYPE")
    assert main(["serve", "--model", "no-such-model", "--speculative-tokens", "99"]) == 2
    assert "speculative_tokens: must be 0..16" in capsys.readouterr().err


def test_serve_sizes_the_batch_for_its_device():
    """Unset flags take the device's defaults (a CPU's small batches, a GPU's wide ones, its
    tokens a step by the model and its KV cache from free memory: None, the engine's); set flags win, 0 included (the engine's config then refuses it)."""
    from shoal.cli import build_parser
    from shoal.cli.serve import batch_defaults

    parse = build_parser().parse_args
    assert batch_defaults(parse(["serve"])) == {"max_num_seqs": 64, "max_num_batched_tokens": 512,
                                                "kv_cache_memory": 256 * 2**20}
    assert batch_defaults(parse(["serve", "--device", "cuda"])) == {
        "max_num_seqs": 256, "max_num_batched_tokens": None, "kv_cache_memory": None}
    got = batch_defaults(parse(["serve", "--device", "cuda:1", "--kv-cache-mb", "512", "--max-num-seqs", "0"]))
    assert got == {"max_num_seqs": 0, "max_num_batched_tokens": None, "kv_cache_memory": 512 * 2**20}


def test_kv_cache_budget_takes_half_the_free_gpu_memory(monkeypatch):
    import torch

    from shoal.config import EngineConfig
    from shoal.engine.preflight import kv_cache_budget

    assert kv_cache_budget(torch.device("cpu")) == 256 * 2**20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    assert kv_cache_budget(torch.device("cuda")) == 5 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert kv_cache_budget(torch.device("cuda")) == 64 * 2**20  # (a floor: some cache, a clear OOM later)
    assert EngineConfig(kv_cache_memory=None).kv_cache_memory is None
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineConfig(kv_cache_memory=0)


def test_token_budget_by_device_and_model_size():
    """Tokens a step where none is set: 512 on a CPU; on CUDA 8,192 for ~1B decoder parameters,
    doubled per halving, at most 32,768 (the shapes of bench/gpu_engine.py); a set value wins."""
    import torch

    from shoal.config import EngineConfig
    from shoal.engine.preflight import decoder_parameters, token_budget
    from shoal.model.config import ModelConfig

    def shape(h, i, layers, heads, kv, family="llama"):
        return ModelConfig.from_hf({"model_type": family, "vocab_size": 49152, "hidden_size": h,
                                    "intermediate_size": i, "num_hidden_layers": layers,
                                    "num_attention_heads": heads, "num_key_value_heads": kv,
                                    "max_position_embeddings": 2048, "n_inner": i})

    smollm2_135m, smollm2_360m = shape(576, 1536, 30, 9, 3), shape(960, 2560, 32, 15, 5)
    llama_1b = shape(2048, 8192, 16, 32, 8)
    assert decoder_parameters(smollm2_135m) == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    cuda, cpu, auto = torch.device("cuda"), torch.device("cpu"), EngineConfig()
    assert auto.max_num_batched_tokens is None
    assert [token_budget(auto, m, cuda) for m in (smollm2_135m, smollm2_360m, llama_1b)] == [32768, 16384, 8192]
    assert token_budget(auto, shape(4096, 14336, 32, 32, 8), cuda) == 8192  # (an 8B: the floor)
    assert token_budget(auto, smollm2_135m, cpu) == 512
    assert token_budget(EngineConfig(max_num_batched_tokens=2048), smollm2_135m, cuda) == 2048
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_batched_tokens=0)


def test_serve_freezes_start_up_objects_out_of_the_collectors_scans():
    import gc

    from shoal.cli.serve import freeze_startup_objects

    try:
        frozen = freeze_startup_objects()
        assert frozen > 1000 and gc.get_freeze_count() > 1000  # (this process: pytest, torch, transformers)
    finally:
        gc.unfreeze()
