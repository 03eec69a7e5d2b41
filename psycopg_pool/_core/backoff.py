"""When to try connecting again after a failure.

The schedule is pool-wide, not per connection slot: an outage is one streak of
failures however many connections are missing, so the server is probed by a
single attempt at a time and the user's `reconnect_failed` callback fires once
per outage.
"""

from __future__ import annotations

import random


class AttemptWithBackoff:
    """The schedule's knobs, where upstream keeps them (`psycopg_pool.base`).

    Code and tests tune them there (`monkeypatch.setattr(AttemptWithBackoff,
    "INITIAL_DELAY", 0.01)` to retry sooner), so they are read from this class when a
    streak of failures starts (and the multiplier at each retry), not copied.
    """

    INITIAL_DELAY = 1.0
    DELAY_JITTER = 0.1
    DELAY_BACKOFF = 2.0


# Once `reconnect_timeout` has passed the pool keeps probing, but never less often than this.
MAX_DELAY = 10.0


class Backoff:
    """A streak of failed connection attempts and the delay before the next one."""

    __slots__ = (
        "delay",
        "failed_at",
        "gave_up",
        "give_up_at",
        "initial_delay",
        "jitter",
        "max_delay",
        "multiplier",
        "retry_at",
        "rng",
        "started_at",
    )

    def __init__(
        self,
        rng: random.Random,
        *,
        initial_delay: float | None = None,
        jitter: float | None = None,
        multiplier: float | None = None,
        max_delay: float = MAX_DELAY,
    ) -> None:
        # None: AttemptWithBackoff's value at the time it is needed.
        self.rng = rng
        self.initial_delay = initial_delay
        self.jitter = jitter
        self.multiplier = multiplier
        self.max_delay = max_delay
        self.started_at: float | None = None  # None: not failing
        self.give_up_at = 0.0
        self.retry_at = 0.0
        self.delay = 0.0
        self.failed_at = 0.0
        self.gave_up = False

    @property
    def failing(self) -> bool:
        return self.started_at is not None

    def failed(self, attempt_started: float, now: float, reconnect_timeout: float) -> bool:
        """Record a failed attempt; return True if this is the moment to give up.

        Only a retry escalates the delay: attempts that were already running in
        parallel when the streak began fail together and count as one step.
        Giving up is reported once per streak; after it the schedule goes on with
        the delay capped at `max_delay` instead of clipped to the give-up time.
        """
        knobs = AttemptWithBackoff
        if self.started_at is None:
            self.started_at = attempt_started
            self.give_up_at = attempt_started + reconnect_timeout
            initial = knobs.INITIAL_DELAY if self.initial_delay is None else self.initial_delay
            jitter = knobs.DELAY_JITTER if self.jitter is None else self.jitter
            self.delay = initial * (1.0 + jitter * (2.0 * self.rng.random() - 1.0))
        elif attempt_started > self.failed_at:
            self.delay *= knobs.DELAY_BACKOFF if self.multiplier is None else self.multiplier
        else:
            return False
        self.failed_at = now

        give_up_now = False
        if not self.gave_up and attempt_started >= self.give_up_at:
            self.gave_up = give_up_now = True

        delay = self.delay
        if self.gave_up:
            delay = min(delay, self.max_delay)
            self.delay = delay
        elif now + delay > self.give_up_at:
            # The last retry of the streak happens right at the give-up time.
            delay = max(0.0, self.give_up_at - now)
        self.retry_at = now + delay
        return give_up_now

    def succeeded(self) -> None:
        self.started_at = None
        self.gave_up = False
        self.delay = 0.0
        self.retry_at = 0.0
