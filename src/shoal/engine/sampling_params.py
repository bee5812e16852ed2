"""SamplingParams: what one request asks of the sampler, with OpenAI's meanings.

temperature 0 means greedy; `n` samples are returned out of `best_of` generated (ranked by mean
token logprob); penalties follow OpenAI's formula over the tokens generated so far; `logit_bias`
is added to the logits before sampling; stop strings are matched across token boundaries and
excluded from the text. Every field is checked in `__post_init__` and a bad one raises a
ValueError naming it. Not here: the sampling itself (sampler.py) or stop matching
(output_processor.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    """One request's sampling settings (OpenAI semantics)."""

    n: int = 1
    """Completions returned."""
    best_of: int | None = None
    """Completions generated (>= n); the n with the highest mean token logprob are returned.
    None means n."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy (argmax), as is anything below GREEDY_BELOW."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 = all."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (-2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated (-2..2)."""
    logit_bias: dict[int, float] | None = None
    """token id -> value added to its logit before sampling (-100..100)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the completion; not included in the returned text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the completion (besides eos)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""
    max_tokens: int | None = 16
    """Most tokens to generate; None = up to the model's context."""
    min_tokens: int = 0
    """Fewest tokens to generate before eos or stop tokens may end the completion."""
    logprobs: int | None = None
    """Return the chosen token's logprob and the top `logprobs` alternatives per token (0..20)."""
    prompt_logprobs: int | None = None
    """Return logprobs of the prompt tokens too (for `echo`), with this many alternatives."""
    seed: int | None = None
    """Seeds this request's own generator: the same seed gives the same tokens, whatever else
    is in the batch."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    prediction: list[int] | None = None
    """OpenAI's Predicted Outputs: token ids the completion is expected to largely repeat (a file
    being edited, say). Where the engine drafts (`EngineConfig.speculative_tokens`), a row drafts
    from them first (`engine.speculative`), so the tokens that match are checked several a step;
    the tokens, text and logprobs are the same as without it."""
    json_mode: bool = False
    """OpenAI's `response_format: {"type": "json_object"}`: only tokens that keep the output a
    prefix of one JSON object are drawn (`engine.json_guide`); once the object is closed, only
    eos. Rows in JSON mode draft (each draft checked against its own mask) but do not fly
    ahead (`async_scheduling`: their next mask waits for their last token)."""
    json_schema: dict | None = None
    """OpenAI's `response_format: {"type": "json_schema"}`: the output is one instance of this
    JSON Schema (the subset `engine.json_schema` enforces; properties in the schema's order), as
    JSON mode is one object."""

    def __post_init__(self) -> None:
        if self.best_of is None:
            self.best_of = self.n
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.best_of, int) or self.best_of < self.n:
            raise ValueError(f"best_of: must be >= n ({self.n}), got {self.best_of!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 = off), got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}: must be in [-2, 2], got {getattr(self, name)}")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                if not isinstance(tok, int) or tok < 0:
                    raise ValueError(f"logit_bias: token id {tok!r} is not a non-negative integer")
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias: value {bias} for token {tok} is outside [-100, 100]")
        if self.stop is None:  # (OpenAI's and vLLM's "no stop")
            self.stop = []
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop: must be a string or a list of strings, got {type(self.stop).__name__}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop: every stop sequence must be a non-empty string")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
                not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be a list of non-negative token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens: must be >= 0, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens: must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} exceeds max_tokens {self.max_tokens}")
        if self.json_schema is not None:
            from .json_schema import SchemaError, compiled

            try:
                compiled(self.json_schema)
            except SchemaError as e:
                raise ValueError(f"json_schema.{e}") from None
        if self.structured and (self.ignore_eos or self.min_tokens):
            field = "ignore_eos" if self.ignore_eos else "min_tokens"
            raise ValueError(f"{field}: cannot be combined with JSON mode or a JSON schema (the "
                             "object's end must be able to end the output)")
        if self.prediction is not None:
            if not isinstance(self.prediction, (list, tuple)) or any(
                    not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.prediction):
                raise ValueError("prediction: must be a list of non-negative token ids")
            self.prediction = list(self.prediction)
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 20:
                raise ValueError(f"{name}: must be in [0, 20], got {v}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def structured(self) -> bool:
        """JSON mode or a JSON schema: the sampler masks the tokens that break it."""
        return self.json_mode or self.json_schema is not None

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# Temperatures below this sample greedily (vLLM's convention): there softmax(l / T) gives the
# argmax all but e^-100 of the mass unless another logit is within 1e-3 of it, and a T that
# rounds to 0 in fp32 (5e-324, say) would divide by zero.
GREEDY_BELOW = 1e-5
