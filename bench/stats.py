"""Summaries of latency samples: p50, p99, mean and max, in milliseconds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Latency statistics of ``n`` samples, in milliseconds."""

    n: int
    p50: float
    p99: float
    mean: float
    max: float


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, interpolating linearly between neighbours."""
    if not ordered:
        raise ValueError("percentile of no samples")
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(seconds: Sequence[float]) -> Summary | None:
    """Summarize samples given in seconds; None when there are none."""
    if not seconds:
        return None
    ms = sorted(s * 1000 for s in seconds)
    return Summary(n=len(ms), p50=percentile(ms, 0.5), p99=percentile(ms, 0.99), mean=sum(ms) / len(ms), max=ms[-1])
