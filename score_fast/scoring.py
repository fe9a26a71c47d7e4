"""Scoring responses with a reward, the way training and evaluation both do: one batched
call, and when the batch raises, each sample alone, so one broken sample scores 0 instead of
stopping the run, while a reward that fails everywhere stops it (RewardError)."""
from __future__ import annotations

import collections

__all__ = ["RewardError", "score_episodes"]


class RewardError(RuntimeError):
    """The reward itself is broken (it fails on every sample, or on the batch while each
    sample alone scores fine, or it timed out on the batch)."""


def score_episodes(reward, texts: list[str], rows: list[dict], name: str = "reward",
                   failures: collections.Counter | None = None
                   ) -> tuple[list[float], int, list[str]]:
    """Scores for texts[i] against rows[i]. If the batch raises, each sample is scored alone
    and a sample that raises scores 0 (counted, its error returned). If every sample
    raises, or none does alone, the reward itself is broken: RewardError.
    failures: a Counter that gets why each zero was given (RewardResult.reasons:
    "wrong_answer", "timeout", ...; "exception" for a sample whose scoring raised)."""
    def one_batch(batch_texts, batch_rows):
        if hasattr(reward, "evaluate"):
            result = reward.evaluate(batch_texts, batch_rows)
            if failures is not None:
                failures.update(result.failures())
            return list(result.scores)
        return list(reward.score(batch_texts, batch_rows))

    try:
        return one_batch(texts, rows), 0, []
    except TimeoutError as e:  # a stuck reward: one call per sample would take N times as long
        raise RewardError(f"{name}: {e}") from e
    except Exception as batch_error:  # noqa: BLE001 - any user reward error
        scores, errors = [], []
        for text, row in zip(texts, rows):
            try:
                scores.append(float(one_batch([text], [row])[0]))
            except Exception as e:  # noqa: BLE001
                scores.append(0.0)
                errors.append(f"{type(e).__name__}: {e}")
        if len(errors) == len(texts) or not errors:
            # every sample fails, or none does alone (e.g. a wrong-length return): the
            # reward itself is broken, not one sample
            first = errors[0] if errors else "each sample alone scores fine"
            raise RewardError(f"{name} failed on the batch: {type(batch_error).__name__}: "
                              f"{batch_error} ({first})") from batch_error
        if failures is not None:
            failures["exception"] += len(errors)
        return scores, len(errors), errors
