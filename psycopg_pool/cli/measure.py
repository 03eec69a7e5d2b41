"""What the benchmark records: log-scale histograms of durations, one set per worker.

A `Histogram` keeps counts in buckets 2% wide (1 µs to about 15 min), so its
memory does not grow with the length of a run and its percentiles are within 2%.
Each worker writes to its own `WorkerRecord` (no lock on the hot path); the
display and the summary merge them.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections import Counter, deque
from itertools import accumulate

_BASE = 1.02
_INV_LOG_BASE = 1.0 / math.log(_BASE)
_MIN = 1e-6  # seconds: the upper bound of the first bucket
_NBUCKETS = 1050  # _MIN * _BASE ** 1050 is about 1,000 s


def _bucket(seconds: float) -> int:
    if seconds <= _MIN:
        return 0
    i = int(math.log(seconds / _MIN) * _INV_LOG_BASE) + 1
    return i if i < _NBUCKETS else _NBUCKETS - 1


def _value(bucket: int) -> float:
    """A representative duration for a bucket: its geometric middle."""
    if bucket == 0:
        return _MIN / 2
    return float(_MIN * _BASE ** (bucket - 0.5))


class Histogram:
    """Counts of durations (in seconds) in logarithmic buckets."""

    __slots__ = ("counts", "max", "n", "total")

    def __init__(self) -> None:
        self.counts = [0] * _NBUCKETS
        self.n = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.counts[_bucket(seconds)] += 1
        self.n += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)

    @classmethod
    def merged(cls, hists: list[Histogram]) -> Histogram:
        res = cls()
        for h in hists:
            res.merge(h)
        return res

    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def quantile(self, q: float) -> float | None:
        """The duration below which a fraction `q` of the samples fall (None if empty)."""
        if not self.n:
            return None
        rank = max(1, math.ceil(q * self.n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(_value(i), self.max)
        return self.max

    def summary(self) -> dict[str, float | None]:
        """p50, p95, p99, max and mean, in milliseconds (None when empty)."""

        def ms(x: float | None) -> float | None:
            return None if x is None else round(x * 1000.0, 4)

        return {
            "p50": ms(self.quantile(0.50)),
            "p95": ms(self.quantile(0.95)),
            "p99": ms(self.quantile(0.99)),
            "max": ms(self.max if self.n else None),
            "mean": ms(self.mean()),
        }

    def sampler(self, rng: random.Random) -> Sampler:
        return Sampler(self, rng)


class Sampler:
    """Draws durations distributed like a histogram's samples."""

    def __init__(self, hist: Histogram, rng: random.Random) -> None:
        self._cum = list(accumulate(hist.counts))
        self._total = self._cum[-1] if self._cum else 0
        self._rng = rng
        self._max = hist.max

    def draw(self) -> float:
        if not self._total:
            return 0.0
        i = bisect_left(self._cum, self._rng.randrange(self._total) + 1)
        return min(_value(i), self._max)


class WorkerRecord:
    """What one worker measured: waits, times in use, latencies, errors."""

    __slots__ = ("errors", "first_errors", "latency", "ops", "use", "wait")

    def __init__(self) -> None:
        self.wait = Histogram()  # in getconn(): from asking to having a connection
        self.use = Histogram()  # holding it: the query, the commit, the return
        self.latency = Histogram()  # both: what the caller of the pool experiences
        self.ops = 0
        self.errors: Counter[str] = Counter()
        self.first_errors: dict[str, str] = {}

    def add(self, wait: float, use: float) -> None:
        self.wait.add(wait)
        self.use.add(use)
        self.latency.add(wait + use)
        self.ops += 1

    def error(self, kind: str, text: str) -> None:
        self.errors[kind] += 1
        self.first_errors.setdefault(kind, text)


class Recent:
    """Latencies of the last moments, for the live display (filled by every worker).

    `deque.append` and `popleft` are atomic, so workers in threads need no lock; the
    display drains what came in since its last look.
    """

    def __init__(self, maxlen: int = 100_000) -> None:
        self._q: deque[float] = deque(maxlen=maxlen)
        self.append = self._q.append

    def drain(self) -> Histogram:
        h = Histogram()
        q = self._q
        for _ in range(len(q)):
            h.add(q.popleft())
        return h
