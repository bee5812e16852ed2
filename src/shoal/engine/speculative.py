"""Speculative decoding by prompt lookup: a row proposes the tokens that followed the latest
earlier occurrence of its last few tokens in its own prompt and output (as llama.cpp's lookup
decoding, vLLM's `ngram` method and HF's `prompt_lookup_num_tokens`), and the step checks them.

Semantics (one step, a sequence of L tokens whose last one is not yet computed, drafts d_1..d_k):
    rows: positions L-1, L, ..., L-1+k with tokens t_{L-1}, d_1, ..., d_k, each a decode row
    y_j = the row's token as the sampler picks it without drafts, for the sequence with d_1..d_j
          appended (`DraftRow`: penalties count them, min_tokens' mask sees them; greedy: the
          argmax; sampled: its draw at the row's own uniform number, the (j+1)-th the
          sequence's generator gives this step)
    accepted j: the longest prefix with y_0 = d_1, ..., y_{j-1} = d_j
    appended: y_0..y_j, one at a time with the usual stop checks (a stop ends the run there)
    computed: L + j tokens (the rows of rejected drafts wrote KV past the sequence's length; the
              next step's rows overwrite it before anything reads it)
    generator: as after j + 1 draws (a sampled row's state is rewound and j + 1 numbers drawn)
A row's logits do not depend on the other rows on the CPU (batch-invariant kernels), so row j
computes what a step of the plain engine would at that position once d_1..d_j are right: the
tokens, logprobs and finish reasons are the ones the engine gives without drafts, only sooner;
a seeded request's too, since each kept token used the number a plain step would have (a draft
is confirmed when the row's own draw picks it: as likely as the model gives it, so sampled rows
at high temperatures confirm fewer).

Predicted Outputs (`SamplingParams.prediction`): a row drafts from the predicted tokens first:
where its last 3/2/1 tokens occur in them, the first occurrence at or after where the output
was last seen in them (the start of the last drafts from them, moved past the ones confirmed;
else the last occurrence), the predicted tokens after it; else from its own context as above.
The drafts are checked as any others: the tokens do not change.

Who drafts: decoding sequences (not a prompt chunk; each sample of an n / best_of request
alone, once forked), in steps whose rows stay few (`ROWS`): on a CPU a decode step of a few rows
costs about one row's (the weights are read once for all), while in large batches the extra rows
would cost compute that the drafts that fail do not repay. How many: a sequence's `size`, 2 more after
a run all confirmed and 1 fewer after a miss, within 1..k (HF's assisted generation adapts its
drafts the same way), so a stream whose drafts miss leaves the step's rows to the others.
"""

from __future__ import annotations

from bisect import bisect_left

from .sequence import Sequence

N_MAX, N_MIN = 3, 1  # the n-grams matched, longest first
ROWS = 32  # a step drafts only while its decode rows and drafts stay within this many
PREDICTED_MAX = 16  # a row with a prediction drafts up to twice the engine's k, at most this many


def draft_limit(seq: Sequence, k: int) -> int:
    """The most drafts seq proposes a step: k, or with a prediction 2k up to PREDICTED_MAX (its
    runs of confirmed drafts are long: on the default model, a paragraph written out again with
    its misspellings fixed, the corrected text the prediction, 4.0 tokens a step at k=8 and 5.45
    with 16, against 3.3 and 4.3 without it; `bench/speculative.py`)."""
    return min(2 * k, max(k, PREDICTED_MAX)) if seq.params.prediction else k


class PromptLookup:
    """One sequence's n-gram index: for each n, n tokens -> where the tokens after their latest
    occurrence start (only occurrences with a token after them, so never the sequence's own
    last n tokens); and, with a prediction, for each n, n tokens -> every start after them in
    the predicted tokens, ascending."""

    __slots__ = ("index", "upto", "size", "predicted", "ahead", "cursor", "from_prediction",
                 "predicted_accepted")

    def __init__(self, size: int, predicted: list[int] | None = None) -> None:
        self.index: list[dict] = [{} for _ in range(N_MAX + 1)]  # index[n]: key -> start
        self.upto = 1  # continuations starting before this position are indexed
        self.size = size  # drafts to propose next (`checked` adapts it)
        self.predicted = predicted or []
        self.ahead: list[dict] = [{} for _ in range(N_MAX + 1)]  # ahead[n]: key -> [start, ...]
        for e in range(1, len(self.predicted)):
            for n in range(N_MIN, min(N_MAX, e) + 1):
                self.ahead[n].setdefault(tuple(self.predicted[e - n:e]), []).append(e)
        self.cursor = 0  # where the output was last seen in the prediction
        self.from_prediction = False  # the last drafts came from the prediction
        self.predicted_accepted = 0  # drafts from the prediction confirmed, so far

    def checked(self, drafted: int, confirmed: int, k: int) -> None:
        """Adapt `size` to how the last drafts fared (at most k, at least 1)."""
        if self.from_prediction:  # the output is now past the confirmed drafts and the next token
            self.predicted_accepted += confirmed
            self.cursor += confirmed + 1
        self.size = min(k, self.size + 2) if confirmed == drafted else max(1, self.size - 1)

    def _from_prediction(self, tokens: list[int], k: int) -> list[int]:
        end = len(tokens)
        for n in range(min(N_MAX, end), N_MIN - 1, -1):
            starts = self.ahead[n].get(tuple(tokens[end - n:]))
            if starts:  # the first at or after the cursor (the output moves forward), else the last
                i = bisect_left(starts, self.cursor)
                self.cursor = starts[i] if i < len(starts) else starts[-1]
                return self.predicted[self.cursor:self.cursor + k]
        return []

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens to propose after `tokens` (empty when no n-gram recurs)."""
        end = len(tokens)
        index = self.index
        for e in range(self.upto, end):  # new continuation starts: e - 1 is a known token
            for n in range(N_MIN, min(N_MAX, e) + 1):
                index[n][tuple(tokens[e - n:e])] = e
        self.upto = max(self.upto, end)
        self.from_prediction = False
        if self.ahead[N_MIN] and (got := self._from_prediction(tokens, k)):
            self.from_prediction = True
            return got
        for n in range(min(N_MAX, end), N_MIN - 1, -1):
            e = index[n].get(tuple(tokens[end - n:]))
            if e is not None:
                return tokens[e:e + k]
        return []


def can_draft(seq: Sequence) -> bool:
    """Whether seq can draft this step: decoding, and not a parent about to fork."""
    return (not seq.needs_fork and seq.num_computed_tokens == len(seq.token_ids) - 1
            and seq.num_computed_tokens >= seq.num_prompt_tokens)


class DraftRow:
    """What the sampler reads of a sequence at its j-th draft row (j >= 1): the sequence as it
    will be once its first j drafts are appended, so penalties count them and min_tokens' mask
    sees them; its generator is the sequence's."""

    __slots__ = ("seq", "j")

    def __init__(self, seq: Sequence, j: int) -> None:
        self.seq, self.j = seq, j

    @property
    def params(self):
        return self.seq.params

    @property
    def sample_index(self) -> int:
        return self.seq.sample_index

    @property
    def generator(self):
        return self.seq.generator

    @generator.setter
    def generator(self, g) -> None:
        self.seq.generator = g

    @property
    def num_generated(self) -> int:
        return self.seq.num_generated + self.j

    @property
    def generated_ids(self) -> list[int]:
        return self.seq.generated_ids + self.seq.draft[:self.j]


def drafted_rows(seqs: list[Sequence]) -> list:
    """The sampler's rows for a step's sequences (a drafting one: its last token's row, then a
    `DraftRow` a draft)."""
    rows: list = []
    i = 0
    while i < len(seqs):
        seq = seqs[i]
        rows.append(seq)
        if seq.draft and seq.num_computed_tokens == len(seq.token_ids) - 1:
            rows += [DraftRow(seq, j) for j in range(1, len(seq.draft) + 1)]
            i += len(seq.draft)
        i += 1
    return rows


def propose(running: list[Sequence], k: int, max_model_len: int) -> None:
    """Set `draft` on the running sequences that can draft, within `ROWS` rows for the step."""
    room = ROWS - len(running)
    for seq in running:
        seq.draft = []
        if room <= 0 or not can_draft(seq):
            continue
        p = seq.params
        # the run appended is at most draft + 1 tokens: within max_tokens and max_model_len
        left = max_model_len - len(seq.token_ids) - 1
        if p.max_tokens is not None:
            left = min(left, p.max_tokens - seq.num_generated - 1)
        limit = draft_limit(seq, k)
        if seq.lookup is None:  # (a prediction past the context could never be written: not indexed)
            seq.lookup = PromptLookup(limit, p.prediction[:max_model_len] if p.prediction else None)
        want = min(seq.lookup.size, limit, left, room)
        if want <= 0:
            continue
        seq.draft = seq.lookup.draft(seq.token_ids, want)
        room -= len(seq.draft)


def accepted(draft: list[int], tokens: list[int]) -> int:
    """j: how many drafts the rows' tokens confirm (tokens[i] is row i's, drafts start at row 1)."""
    j = 0
    while j < len(draft) and tokens[j] == draft[j]:
        j += 1
    return j
