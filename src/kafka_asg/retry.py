"""The one retry policy: deadline-bounded, jittered, sleep injectable, retrying only named failures.

Shaped after kazoo's ``KazooRetry`` and Patroni's ``utils.Retry``; the AWS allowlist follows
amazon.aws ``AWSRetry`` (throttling and 5xx codes only; everything else fails fast).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from kafka_asg.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# AWS error codes that mean "the same request may succeed later".
# https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html
RETRYABLE_AWS_CODES = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "Unavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
        "SlowDown",
        "EC2ThrottledException",
    }
)


class RetryExhausted(Unavailable):
    """The deadline or the number of tries ran out; ``last`` is the final failure."""

    def __init__(self, what: str, tries: int, last: BaseException) -> None:
        self.last = last
        super().__init__(f"{what}: gave up after {tries} tries: {last}")


@dataclass(frozen=True)
class Retry:
    """Retry a call while it raises a retryable error, until ``deadline`` seconds have passed.

    :param deadline: total seconds allowed, counted from the first try.
    :param max_tries: upper bound on tries (``None`` = only the deadline bounds it).
    :param delay: first sleep; multiplied by ``backoff`` after every failure, capped at ``max_delay``.
    :param max_jitter: up to this fraction of the sleep is added at random, so nodes do not retry in step.
    :param retry_on: exception types that count as transient.
    """

    deadline: float = 30.0
    max_tries: int | None = None
    delay: float = 0.2
    backoff: float = 2.0
    max_delay: float = 5.0
    max_jitter: float = 0.25
    retry_on: tuple[type[BaseException], ...] = (Unavailable,)
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)

    def with_deadline(self, deadline: float) -> Retry:
        return replace(self, deadline=deadline)

    def __call__(self, what: str, func: Callable[[], T]) -> T:
        start = self.clock()
        delay = self.delay
        tries = 0
        while True:
            tries += 1
            try:
                return func()
            except self.retry_on as exc:
                elapsed = self.clock() - start
                pause = min(delay, self.max_delay) * (1 + random.uniform(0, self.max_jitter))
                out_of_tries = self.max_tries is not None and tries >= self.max_tries
                if out_of_tries or elapsed + pause > self.deadline:
                    raise RetryExhausted(what, tries, exc) from exc
                logger.debug("%s: try %d failed (%s); retrying in %.2fs", what, tries, exc, pause)
                self.sleep(pause)
                delay *= self.backoff


def wait_until(
    what: str,
    predicate: Callable[[], T | None],
    *,
    deadline: float,
    interval: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Poll ``predicate`` until it returns something truthy, or raise :class:`Unavailable` at the deadline."""
    start = clock()
    while True:
        result = predicate()
        if result:
            return result
        if clock() - start >= deadline:
            raise Unavailable(f"timed out after {deadline:.0f}s waiting for {what}")
        sleep(interval)
