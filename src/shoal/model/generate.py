"""Reference generation: one sequence, a dense KV cache, greedy or seeded sampling.

This is the plain loop the engine is tested against, not the serving path: no batching, no
paging, no penalties. Sampling draws from the request's own `torch.Generator`, so a seed fixes
the tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .attention import DenseKVCache
from .transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> int:
    """Pick one token from fp32 logits (vocab,): argmax at temperature 0, else sample from
    softmax(logits / temperature) restricted to the top_k tokens and the top_p nucleus."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream_tokens(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, *,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int | None = None, stop_token_ids: Sequence[int] = (),
                  use_cache: bool = True) -> Iterator[int]:
    """Yield generated token ids one at a time; stops after a stop token (which is yielded) or
    max_new_tokens.

    Args:
        model: the transformer (any dtype/device).
        prompt_ids: the prompt, at least one token.
        max_new_tokens: upper bound on generated tokens.
        temperature, top_p, top_k: sampling; temperature 0 is greedy.
        seed: seeds this call's own generator (None: nondeterministic).
        stop_token_ids: ids that end generation (e.g. eos).
        use_cache: False recomputes the whole sequence each step (the no-cache reference).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids: must hold at least one token")
    device = next(model.parameters()).device
    total = len(prompt_ids) + max_new_tokens
    limit = model.config.max_position_embeddings
    if total > limit:
        raise ValueError(f"max_new_tokens: prompt ({len(prompt_ids)}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds the model's context of {limit} tokens")
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    stops = set(stop_token_ids)
    ids = list(prompt_ids)
    cache = DenseKVCache.for_model(model, batch=1, max_len=total) if use_cache else None
    step_ids = ids
    for _ in range(max_new_tokens):
        if use_cache:
            # 1) prefill the whole prompt once, 2) then decode one token per step
            start = cache.length
            x = torch.tensor([step_ids], device=device)  # (1, T)
            pos = torch.arange(start, start + x.shape[1], device=device)[None]
            hidden = model(x, pos, cache)
        else:
            hidden = model(torch.tensor([ids], device=device))
        logits = model.compute_logits(hidden[0, -1])  # (vocab,)
        tok = sample_next(logits, temperature, top_p, top_k, gen)
        ids.append(tok)
        yield tok
        if tok in stops:
            return
        step_ids = [tok]


def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, **kwargs) -> list[int]:
    """The generated ids (prompt excluded) as a list; kwargs as in `stream_tokens`."""
    return list(stream_tokens(model, prompt_ids, max_new_tokens, **kwargs))
