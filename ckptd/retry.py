"""The one retry policy, built from `upload.retry` with tenacity.

A failed publish is not retried in a loop inside a worker: the journal records when the next
attempt is due, so retries survive restarts and never hold up a shutdown. Short operations
(moving an alias, deleting a version) retry in place with `retrying()`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from ckptd.config import RetryConfig
from ckptd.errors import PublishError

__all__ = ["GiveUp", "Park", "Retry", "RetryPolicy", "next_after_failure"]

T = TypeVar("T")


class RetryPolicy:
    """Exponential backoff with jitter, capped at max_delay, bounded by give_up_after."""

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._wait = tenacity.wait_exponential(
            multiplier=config.initial_delay, max=config.max_delay
        )
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

        Full jitter on the upper half of the backoff keeps a fleet of daemons from retrying
        in lockstep; a server's Retry-After is honoured as a floor.
        """
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        backoff = float(self._wait(state))
        jittered = backoff / 2 + self._rng.uniform(0, backoff / 2)
        if retry_after is not None:
            jittered = max(jittered, min(retry_after, self.config.max_delay))
        return jittered

    def gives_up(self, first_failure_at: float, now: float) -> bool:
        """True once a checkpoint has been failing for longer than give_up_after."""
        return now - first_failure_at >= self.config.give_up_after

    def retrying(self, fn: Callable[[], T], attempts: int = 5) -> T:
        """Call `fn`, retrying transient PublishErrors a few times with this backoff."""
        retryer = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda exc: isinstance(exc, PublishError) and exc.transient
            ),
            wait=tenacity.wait_exponential_jitter(
                initial=min(self.config.initial_delay, 1.0), max=self.config.max_delay
            ),
            stop=tenacity.stop_after_attempt(attempts),
            reraise=True,
        )
        return retryer(fn)


@dataclass(frozen=True)
class Retry:
    """Try the checkpoint again at `at`."""

    at: float
    attempts: int
    first_failure_at: float


@dataclass(frozen=True)
class Park:
    """Stop the whole collection: retrying cannot help until someone fixes the cause."""

    reason: str
    attempts: int


@dataclass(frozen=True)
class GiveUp:
    """This checkpoint has failed for longer than `give_up_after`: it ends `failed`."""

    attempts: int
    first_failure_at: float


def next_after_failure(
    policy: RetryPolicy,
    error: PublishError,
    *,
    attempts: int,
    first_failure_at: float | None,
    now: float,
) -> Retry | Park | GiveUp:
    """What to do after attempt number `attempts` of a publish failed with `error`: a
    permanent error parks the collection (the key, a permission, a name: the next
    checkpoint would fail the same way); a transient one is retried with backoff until the
    checkpoint has failed for `give_up_after`. A function of its arguments alone (and of the
    policy's jitter)."""
    first = now if first_failure_at is None else first_failure_at
    if not error.transient:
        return Park(str(error), attempts)
    if policy.gives_up(first, now):
        return GiveUp(attempts, first)
    return Retry(now + policy.delay(attempts, error.retry_after), attempts, first)
