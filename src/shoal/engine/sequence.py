"""Sequence: one stream of tokens being generated, with its KV-cache bookkeeping.

A request with `best_of` > 1 starts as one sequence (sample 0) that prefills the prompt; once
the prompt's logits exist the engine forks it into `best_of` sequences that share the prompt's
KV blocks. The scheduler and block manager read only plain fields here (token ids, counters,
block table), so they stay pure Python; the engine hangs the sampler's generator and the
output state on the same object.
"""

from __future__ import annotations

import enum
import itertools
import time

from .sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_FINISHED = SequenceStatus.FINISHED  # (`status == SequenceStatus.FINISHED` took ~90 ns, `is` this ~15)


class Sequence:
    """Token ids (prompt + generated) and where their keys/values live."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, *,
                 adapter: str | None = None, sample_index: int = 0,
                 arrival_time: float | None = None) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.params = params
        self.adapter = adapter  # LoRA adapter name; None = the base model
        self.sample_index = sample_index
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        # filled by the engine
        self.generator = None  # torch.Generator for this sample
        self.cumulative_logprob = 0.0
        self.logprobs: list = []  # per generated token: (token_logprob, {top id: logprob})
        self.prompt_logprobs: list | None = None
        self.forked = False  # True once a best_of>1 parent has been forked into its samples
        self.draft: list[int] = []  # tokens proposed to check after the last one this step
        self.lookup = None  # its n-gram index (`speculative.PromptLookup`), made when first needed
        self.state = None  # its text-side state (`output_processor.SeqState`)
        self.guide = None  # JSON mode: its automaton (`json_guide.JsonGuide`), made when first needed

    # ---- sizes ------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model (a prompt chunk, or 1 when decoding)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED

    @property
    def needs_fork(self) -> bool:
        """A best_of>1 parent whose prompt is computed but whose samples do not exist yet."""
        return self.params.best_of > 1 and not self.forked

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))

    def fork(self, sample_index: int) -> "Sequence":
        """A sibling sample sharing everything computed so far (the block manager must fork the
        block table too: `BlockManager.fork`)."""
        child = Sequence(self.request_id, self.prompt_ids, self.params, adapter=self.adapter,
                         sample_index=sample_index, arrival_time=self.arrival_time)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_table = list(self.block_table)
        child.status = self.status
        child.forked = True
        child.prompt_logprobs = self.prompt_logprobs
        return child

    def reset_for_recompute(self) -> None:
        """Preempted: drop the KV bookkeeping; the generated tokens stay and are recomputed."""
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self.draft = []

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.value})")
