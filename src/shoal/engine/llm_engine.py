"""LLMEngine: requests in, RequestOutputs out, one `step()` at a time.

`step()` is schedule -> run -> postprocess. Around it: admission checks (every bad field is a
ValueError naming it), the fork of a best_of>1 request into its samples once the prompt is
computed (they share the prompt's KV blocks), and abort. One engine serves one base model and,
with `enable_lora`, any number of adapters in the same batches. Not thread-safe: the async
engine drives it from one thread.
"""

from __future__ import annotations

import itertools
import time

import torch

from .. import kernels
from ..config import EngineConfig
from ..model.fused import fuse_projections
from ..model.loader import LoadedModel, resolve_dtype
from ..model.layers import set_triton_ops
from ..model.packed import native_bf16_cpu, pack_linears
from .block_manager import BlockManager
from .decode_ahead import DecodeAhead
from .heap import HEAP_TRIM_INTERVAL_S, release_free_heap
from .model_runner import ModelRunner, StepResult
from .output_processor import OutputProcessor, Request
from .outputs import RequestOutput
from .paged_attention import PagedKVCache
from .preflight import (INVARIANT_K, check_int8_kv, check_int8_lora, kv_cache_budget, set_batch_invariant,
                        token_budget)
from .sampler import Sampler, make_generator, prompt_logprobs
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .sequence import Sequence
from .speculative import accepted, draft_limit, drafted_rows, propose


def default_dtype(device: str) -> torch.dtype:
    """bf16 on CUDA, on CPUs with native bf16 matmuls (AVX512-BF16/AMX) and where Shoal's packed
    products run (`kernels.qlinear`: any AVX-512 CPU; bf16 weights are half the bytes a decode step
    reads), else fp32 (PyTorch's bf16 matmuls without native bf16 are slower than fp32)."""
    if device.startswith("cuda") or native_bf16_cpu():
        return torch.bfloat16
    from ..kernels import ops, qlinear

    return torch.bfloat16 if ops.enabled() and qlinear.packed_ready() else torch.float32


def load_for_engine(config: EngineConfig) -> LoadedModel:
    from ..model.registry import ModelRegistry

    dtype = default_dtype(config.device) if config.dtype == "auto" else resolve_dtype(config.dtype)
    return ModelRegistry().load(config.model, dtype=dtype, device=config.device)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        if config.num_threads and config.device == "cpu":
            torch.set_num_threads(config.num_threads)
        loaded = loaded or load_for_engine(config)
        if loaded.tokenizer is None:
            raise ValueError(f"model: {loaded.source} has no tokenizer; the engine needs one")
        self.model, self.tokenizer, self.model_config = loaded.model, loaded.tokenizer, loaded.config
        if config.quantization:  # in place (a passed-in model too), before LoRA wraps the linears
            from ..model.quant import quantize_model

            codes = None
            if config.quantization == "q4":  # a GGUF's 4-bit blocks as they are (`model.gguf_q4`)
                from ..model.gguf_q4 import codes_for

                codes = codes_for(loaded.source)
            quantize_model(self.model, config.quantization, codes)
        elif config.pack_weights:  # bf16 on a CPU with AMX or AVX512-BF16: our kernel (`PackedBF16Linear`)
            from ..model.bf16_linear import pack_bf16

            pack_bf16(self.model)
        fuse_projections(self.model)  # q/k/v and gate/up as one product each (in place, once)
        p = next(self.model.parameters())  # dtype and device, read before packing (PackedWeight is meta)
        if config.pack_weights:  # CPU float linears in oneDNN's layout (`shoal.model.packed`)
            bf16 = p.dtype == torch.bfloat16
            # an fp32 output layer tied to the embedding gets a packed copy when rows must keep
            # their bits: fp32 CPU GEMMs give a row other bits at other row counts, the packed
            # product does not (+V x hidden x 4 bytes: 113 MB for SmolLM2-135M)
            pack_linears(self.model, INVARIANT_K if config.batch_invariant and bf16 else 0,
                         pack_tied=config.batch_invariant and p.dtype == torch.float32)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        if config.kv_cache_dtype == "int8":
            check_int8_kv(config, mc, p.dtype)
            kv_dtype = torch.int8
        else:
            kv_dtype = p.dtype if config.kv_cache_dtype == "auto" else resolve_dtype(config.kv_cache_dtype)
        per_block = PagedKVCache.bytes_per_block(mc.num_layers, config.block_size, mc.num_kv_heads,
                                                 mc.head_dim, kv_dtype)
        budget = config.kv_cache_memory if config.kv_cache_memory is not None else kv_cache_budget(p.device)
        num_blocks = config.num_kv_blocks or max(budget // per_block, 1)
        # a batch-invariant CPU engine recomputes and reuses KV only by the path that wrote it
        # (prefill or decode: `BlockManager`'s path_keys, `Scheduler.chunk`)
        exact = config.batch_invariant and p.device.type == "cpu"
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                          path_keys=exact)
        self.scheduler = Scheduler(config, self.block_manager, token_budget(config, mc, p.device))
        self.lora = None
        if config.enable_lora:
            from ..lora.adapter_cache import LoRAManager

            # CPU: slots in the model's dtype when the CPU kernel computes the deltas (it reads
            # bf16 slots as they are: half the bytes of fp32 a decode step reads, and 32 adapters
            # on SmolLM2-135M read ~300 MB of fp32 slots a step); else fp32, the dtype the
            # PyTorch products run in (`lora.grouping.lora_deltas`): casting bf16 slots every
            # step added ~9 ms of copies to a 32-adapter decode step (profiled)
            lora_dtype = p.dtype
            if p.device.type == "cpu" and not (p.dtype in (torch.float32, torch.bfloat16) and kernels.enabled()):
                lora_dtype = torch.float32
            if config.lora_dtype == "int8":
                check_int8_lora(config, p.dtype)
                lora_dtype = torch.int8
            self.lora = LoRAManager(self.model, config.max_loras, config.max_lora_rank,
                                    config.max_cpu_loras, device=p.device, dtype=lora_dtype)
            self.lora.mapping.grouped = True  # packed batches: one tiled product per layer
        if config.batch_invariant:
            set_batch_invariant(self.model)
        set_triton_ops(self.model, config.triton_kernels)
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, lora=self.lora,
                                  kv_dtype=kv_dtype, cuda_graphs=config.cuda_graphs,
                                  triton_attention=config.triton_kernels,
                                  max_num_seqs=config.max_num_seqs)
        self.runner.decode_chunks = exact  # (a preempted sequence's generated tokens: decode rows)
        eos = self.tokenizer.stop_token_ids
        self.sampler = Sampler(eos, triton=config.triton_kernels, tokenizer=self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer, eos, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._seq_req: dict[int, Request] = {}
        self.async_outputs = config.async_outputs if config.async_outputs is not None else p.device.type == "cuda"
        self._deferred: list[Request] = []  # requests the last step touched (async_outputs)
        ahead = config.async_scheduling if config.async_scheduling is not None else p.device.type == "cuda"
        self.ahead = DecodeAhead(self) if ahead else None
        k = config.speculative_tokens  # (not with decode_ahead, whose flights carry one token a row)
        if k is None:
            k = 8 if p.device.type == "cpu" else 0
        self.speculative_tokens = k if self.ahead is None else 0
        self.drafted = self.accepted = 0  # draft tokens checked, and confirmed, since start
        self._ids = itertools.count()
        release_free_heap()  # what loading, fusing and packing freed
        self._last_trim = time.monotonic()

    # ---- requests ---------------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams,
                    adapter: str | None = None, final_only: bool = False) -> str:
        """Queue a request; raises ValueError naming the bad field. Returns its id. `final_only`:
        `step` returns its output once, finished (no per-step outputs to build)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already running")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._validate(ids, params, adapter)
        req = Request(request_id, ids, params, adapter, final_only=final_only)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        seq = Sequence(request_id, ids, params, adapter=adapter, sample_index=0)
        self._attach(req, seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)
        return request_id

    def _validate(self, ids: list[int], params: SamplingParams, adapter: str | None) -> None:
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("prompt: must contain at least one token")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within "
                             f"max_model_len {self.max_model_len}")
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens "
                             f"({params.max_tokens}) exceeds max_model_len {self.max_model_len}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias: token id {max(params.logit_bias)} is outside the vocabulary")
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise ValueError(f"stop_token_ids: token id {max(params.stop_token_ids)} is outside the vocabulary "
                             f"(0..{vocab - 1})")
        total = len(ids) + (params.max_tokens if params.max_tokens is not None
                            else self.max_model_len - len(ids))
        if not self.scheduler.can_fit(min(total, self.max_model_len)):
            raise ValueError(f"prompt: {len(ids)} tokens + max_tokens cannot fit in the KV cache "
                             f"({self.block_manager.num_blocks} blocks of {self.config.block_size})")
        if adapter is not None:
            if self.lora is None:
                raise ValueError(f"model: adapter {adapter!r} requested but LoRA is not enabled")
            if not self.lora.has_adapter(adapter):
                raise ValueError(f"model: unknown adapter {adapter!r}")

    def _attach(self, req: Request, seq: Sequence) -> None:
        seq.generator = make_generator(req.params.seed, seq.sample_index)
        req.seqs.append(seq)
        seq.state = self.outputs.new_state(seq)
        self._seq_req[seq.seq_id] = req

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free all its KV blocks; False if it is not running."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        for s in req.seqs:
            self._seq_req.pop(s.seq_id, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule -> run -> sample and check stops -> outputs. With
        `async_outputs` the outputs returned are the previous step's, built while the device runs
        this step's forward (launched, not yet waited on); with `async_scheduling` a decode step
        may be launched before the previous one lands (`decode_ahead`)."""
        ahead = self.ahead
        if ahead is not None and ahead.flight is not None:  # chain the next step, land this one
            outputs = self._outputs(self._take_deferred() + ahead.step())
        else:
            if self.speculative_tokens:
                propose(self.scheduler.running, self.speculative_tokens, self.max_model_len)
            sched = self.scheduler.schedule()
            if not sched.scheduled:
                return self._outputs(self._take_deferred())
            result = self.runner.run(sched.scheduled, sched.copies)
            if ahead is not None and ahead.take_off(sched, result):
                outputs = self._outputs(self._take_deferred())
            elif self.async_outputs:
                outputs = self._outputs(self._take_deferred())  # overlaps the device's work
                self._deferred = self._postprocess(sched, result)  # (the sampler waits for the logits)
            else:
                outputs = self._outputs(self._postprocess(sched, result))
        now = time.monotonic()
        if now - self._last_trim >= HEAP_TRIM_INTERVAL_S:  # see HEAP_TRIM_INTERVAL_S
            release_free_heap()
            self._last_trim = now
        return outputs

    def _take_deferred(self) -> list[Request]:
        reqs, self._deferred = self._deferred, []
        return reqs

    def _postprocess(self, sched: SchedulerOutput, result: StepResult) -> list[Request]:
        """Account the step's tokens, sample, append and check stops; the requests it touched."""
        touched: dict[str, Request] = {}
        seq_req, commit = self._seq_req, self.block_manager.commit
        drafted = False
        for seq, n in sched.scheduled:
            touched[seq.request_id] = seq_req[seq.seq_id]
            if seq.draft and n > 1:  # accounted once its drafts are checked (`_append_drafted`)
                drafted = True
                continue
            seq.num_computed_tokens += n
            commit(seq)
        for seq_id, (p0, logits) in result.prompt_logits.items():
            req = seq_req[seq_id]
            seq = req.seqs[0]
            skip = len(req.prompt_logprobs) - (p0 + 1)  # positions recorded before a preemption
            if skip >= logits.shape[0]:
                continue
            if skip > 0:
                p0, logits = p0 + skip, logits[skip:]
            nxt = seq.token_ids[p0 + 1:p0 + 1 + logits.shape[0]]
            for tok, (lp, top) in zip(nxt, prompt_logprobs(logits, nxt, seq.params.prompt_logprobs)):
                req.prompt_logprobs.append((tok, lp, top))
        seqs = result.sample_seqs
        rows = None  # row i of the logits samples seqs[i], unless a parent forks or a row drops out
        for seq in seqs:
            p = seq.params
            if p.best_of > 1 or p.max_tokens == 0:
                rows, seqs = self._families(result.sample_seqs)
                break
        if seqs:
            logits = result.sample_logits  # (B, V); gathered only when rows fork or drop out
            if rows is not None and rows != list(range(logits.shape[0])):
                logits = logits[torch.tensor(rows, device=logits.device)]
            if drafted:
                # a sampled drafting row's generator, as it was: its rows each draw a number, but
                # only the rows whose tokens are kept may have (`_append_drafted` rewinds)
                states = {s.seq_id: s.generator.get_state() for s, _ in sched.scheduled
                          if s.draft and not s.params.greedy}
                self._append_drafted(seqs, *self.sampler.sample(logits, drafted_rows(seqs)), states)
            else:
                self._append(seqs, *self.sampler.sample(logits, seqs))
        return list(touched.values())

    def _append_drafted(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float],
                        tops: list[dict[int, float] | None], states: dict) -> None:
        """`_append` for a step with drafts: a drafting sequence's rows are consecutive (its last
        token's, then one a draft); the tokens they confirm and the next are appended one by one
        (`speculative`'s Semantics). A sampled row's generator is left as m plain steps would
        leave it: `states` (seq id -> its state before the step) rewound, m numbers drawn."""
        plain: list[int] = []
        i = 0
        while i < len(seqs):
            seq = seqs[i]
            d = len(seq.draft)
            if not d or seq.num_computed_tokens != len(seq.token_ids) - 1:
                plain.append(i)
                i += 1
                continue
            m = accepted(seq.draft, tokens[i:i + d]) + 1  # tokens appended: confirmed drafts + 1
            seq.draft = []
            seq.lookup.checked(d, m - 1, draft_limit(seq, self.speculative_tokens))
            self.drafted += d
            self.accepted += m - 1
            if m <= d and seq.seq_id in states:  # the rejected rows' draws are taken back
                seq.generator.set_state(states[seq.seq_id])
                for _ in range(m):
                    self.sampler.draw_uniform(seq.generator)
            for r in range(i, i + m):  # as m plain steps: a row computed, then its token
                seq.num_computed_tokens += 1
                self.block_manager.commit(seq)
                self._append([seq], [tokens[r]], [logprobs[r]], [tops[r]])
                if seq.is_finished:
                    break
            i += d + 1
        if plain:
            self._append([seqs[i] for i in plain], [tokens[i] for i in plain], [logprobs[i] for i in plain],
                         [tops[i] for i in plain])

    def _families(self, sample_seqs: list[Sequence]) -> tuple[list[int], list[Sequence]]:
        """(logits row, sequence) pairs of a step whose rows fork or drop out: a best_of>1 parent
        forks into its samples, each drawing from its row; a prompt-only row (max_tokens 0: echo,
        logprobs) finishes every sample empty."""
        rows: list[int] = []
        seqs: list[Sequence] = []
        for i, seq in enumerate(sample_seqs):
            family = [seq]
            if seq.needs_fork:
                req = self._seq_req[seq.seq_id]
                seq.forked = True
                children = [seq.fork(k) for k in range(1, seq.params.best_of)]
                for c in children:
                    self._attach(req, c)
                self.scheduler.fork(seq, children)
                family += children
            if seq.params.max_tokens == 0:
                for s in family:
                    s.finish_reason = "length"
                    self.scheduler.finish(s)
                continue
            rows += [i] * len(family)
            seqs += family
        return rows, seqs

    def _outputs(self, touched: list[Request]) -> list[RequestOutput]:
        """The outputs of the requests a step touched; a finished request is dropped after its
        last one. Requests aborted since that step report nothing."""
        outs = []
        for req in touched:
            if self.requests.get(req.request_id) is not req:
                continue  # aborted meanwhile (async_outputs)
            if req.final_only and not req.all_done:
                continue
            out = self.outputs.request_output(req)  # (None: not done, best_of ranks at the end)
            if out is not None:
                outs.append(out)
            if out is not None and out.finished:
                self.requests.pop(req.request_id, None)
                for s in req.seqs:
                    self._seq_req.pop(s.seq_id, None)
        return outs

    def _append(self, seqs: list[Sequence], tokens: list[int], logprobs: list[float],
                tops: list[dict[int, float] | None]) -> None:
        """Each sequence's sampled token appended and its stops checked (per row per step: plain)."""
        check_stop = self.outputs.check_stop
        for seq, tok, lp, top in zip(seqs, tokens, logprobs, tops):
            seq.token_ids.append(tok)
            seq.cumulative_logprob += lp
            if seq.params.logprobs is not None:
                seq.logprobs.append((tok, lp, top or {}))
            reason = check_stop(seq, seq.state, tok)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
