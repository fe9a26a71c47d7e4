"""The interface every reward shares: score a batch, and say why each zero was given."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Mapping, Sequence

OK = "ok"  # the reason recorded for a positive score


@dataclass(frozen=True)
class RewardResult:
    """scores[i] for responses[i]; reasons[i] is "ok" for a positive score, otherwise why it
    is 0 (e.g. "no_answer", "wrong_answer", "timeout", "crash", "memory")."""
    scores: list[float]
    reasons: list[str]

    def failures(self) -> dict[str, int]:
        """How many zeros of each kind: the failure mix the trainer logs."""
        return dict(collections.Counter(r for r in self.reasons if r != OK))


class Reward:
    """Batched reward: `score(responses, rows)` -> one float per response, where rows[i] holds
    the dataset fields of responses[i]'s problem. `evaluate` also gives the reasons."""

    def evaluate(self, responses: Sequence[str], rows: Sequence[Mapping]) -> RewardResult:
        if len(responses) != len(rows):
            raise ValueError(f"{len(responses)} responses but {len(rows)} rows")
        return self._evaluate(list(responses), list(rows))

    def score(self, responses: Sequence[str], rows: Sequence[Mapping]) -> list[float]:
        return self.evaluate(responses, rows).scores

    def _evaluate(self, responses: list[str], rows: list[Mapping]) -> RewardResult:
        raise NotImplementedError

    def close(self) -> None:
        """Stop worker processes, if any. Safe to call twice; score() restarts them."""

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - half-built object, interpreter shutdown
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
