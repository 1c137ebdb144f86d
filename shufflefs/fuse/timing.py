"""How long the filesystem took to answer each kind of FUSE request: counts per latency bucket
and their sum, kept by both sessions, read by the metrics endpoint (shufflefs.metrics). A
request costs one perf_counter pair and one bisect."""

from __future__ import annotations

import bisect

#: upper bounds, in seconds, of the latency buckets (then +Inf): a request answered from memory
#: takes tens of microseconds, one that waits for the store milliseconds to seconds
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class RequestTimes:
    def __init__(self) -> None:
        #: kind -> [observations per bucket (the last: above every bound), sum of seconds]
        self._by_kind: dict[str, list] = {}

    def record(self, kind: str, seconds: float) -> None:
        entry = self._by_kind.get(kind)
        if entry is None:
            entry = self._by_kind[kind] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
        entry[0][bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        entry[1] += seconds

    def snapshot(self) -> dict[str, dict]:
        """{kind: {"buckets": observations per bucket, "sum": seconds}}, a copy."""
        return {kind: {"buckets": list(counts), "sum": total} for kind, (counts, total) in self._by_kind.items()}
