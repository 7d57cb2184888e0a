"""Summaries of repeated measurements: median and tail percentiles, in the samples' own unit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks.

    With few samples a p99 is close to the maximum; the sample count is always reported beside it.
    """
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    """Distribution of one measured quantity."""

    n: int
    median: float
    p90: float
    p99: float
    min: float
    max: float
    mean: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(samples: Sequence[float]) -> Summary:
    """Summary of ``samples`` (NaN everywhere when there are none)."""
    if not samples:
        nan = math.nan
        return Summary(0, nan, nan, nan, nan, nan, nan)
    return Summary(
        n=len(samples),
        median=percentile(samples, 50),
        p90=percentile(samples, 90),
        p99=percentile(samples, 99),
        min=min(samples),
        max=max(samples),
        mean=sum(samples) / len(samples),
    )


def scaled(samples: Sequence[float], factor: float) -> list[float]:
    """``samples`` times ``factor`` (seconds to milliseconds, bytes to MiB)."""
    return [value * factor for value in samples]
