"""What the engine returns: RequestOutput with one CompletionOutput per returned sample.

Streaming consumers read the deltas (`text_delta`, `token_ids_delta`, `logprobs_delta`); final
consumers read the totals. Token logprobs are `(token_id, logprob, {top_id: logprob})` tuples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TokenLogprob = tuple[int, float, dict[int, float]]


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's n completions (0-based)."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """None while running; "stop" (eos, stop token or stop string) or "length"."""
    stop_reason: str | int | None = None
    """The stop string or token id that ended it, if any."""
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprob] | None = None
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def mean_logprob(self) -> float:
        return self.cumulative_logprob / max(len(self.token_ids), 1)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """Per prompt position (the first is None: nothing predicts it)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    adapter: str | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
