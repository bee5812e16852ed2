"""Types shared by the data pipeline and the trainer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Example:
    """One tokenized training example.

    `tokens[i]` is the i-th token id; `weights[i]` is 1 when token i is a training target
    (predicted from tokens[:i]: completion / assistant tokens of a weight-1 message), else 0.
    `weights[0]` is always 0 (nothing predicts the first token). Lengths are equal.
    `line` is the 1-based line of the JSONL file it came from (for messages and reports).
    """

    tokens: tuple[int, ...]
    weights: tuple[int, ...]
    line: int = 0

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.weights):
            raise ValueError(f"example at line {self.line}: {len(self.tokens)} tokens but "
                             f"{len(self.weights)} weights")

    @property
    def n_targets(self) -> int:
        return sum(self.weights)

    def __len__(self) -> int:
        return len(self.tokens)
