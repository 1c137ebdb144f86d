"""Prometheus metrics of a running mount (`--metrics-addr HOST:PORT`), served over HTTP by
prometheus_client in a thread of its own. Every scrape takes one snapshot of the daemon's
counters on the trio thread (the core is only ever touched there), the same counters
`shufflefs stats` prints, and turns it into metric families; the process's CPU and memory
come from prometheus_client's standard process collector."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

from shufflefs.fuse.timing import LATENCY_BUCKETS

PREFIX = "shufflefs"


class MountCollector:
    """Metric families from the daemon's snapshot; nothing until the daemon attached its
    snapshot function, nothing once its loop has finished."""

    def __init__(self) -> None:
        self._source: tuple[Callable[[], dict], trio.lowlevel.TrioToken] | None = None

    def attach(self, snapshot: Callable[[], dict], token: trio.lowlevel.TrioToken) -> None:
        """`snapshot()` runs on the trio loop of `token`."""
        self._source = (snapshot, token)

    def collect(self) -> Iterator:
        if self._source is None:
            return
        snapshot, token = self._source
        try:
            stats = trio.from_thread.run_sync(snapshot, trio_token=token)
        except trio.RunFinishedError:
            return
        yield from families(stats)


def families(stats: dict) -> Iterator:
    """The metric families of one snapshot (`shufflefs stats`, plus `fuse.latency`)."""
    fuse, store = stats["fuse"], stats["store"]
    yield InfoMetricFamily(
        f"{PREFIX}_mount",
        "what this mount serves, and how",
        value={
            "store": stats["store_url"],
            "commit": stats["commit"],
            "fuse_session": fuse["session"],
            "passthrough": str(fuse["passthrough"]).lower(),
        },
    )

    requests = CounterMetricFamily(f"{PREFIX}_fuse_requests", "FUSE requests received, by kind", labels=["kind"])
    for kind, count in sorted(fuse["requests"].items()):
        requests.add_metric([kind.lower()], count)
    yield requests
    latency = HistogramMetricFamily(
        f"{PREFIX}_fuse_request_seconds", "time the filesystem took to answer a FUSE request, by kind", labels=["kind"]
    )
    for kind, observed in sorted(fuse.get("latency", {}).items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], observed["buckets"]):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric([kind.lower()], buckets, observed["sum"])
    yield latency

    store_requests = CounterMetricFamily(
        f"{PREFIX}_store_requests", "requests sent to the store, by kind", labels=["kind"]
    )
    for name, count in sorted(store.items()):
        if name.endswith("_requests") and name != "failed_requests":
            store_requests.add_metric([name.removesuffix("_requests")], count)
    yield store_requests
    yield CounterMetricFamily(
        f"{PREFIX}_store_failed_requests",
        "store requests that failed (retried, unless the store refused the operation for good)",
        value=store.get("failed_requests", 0),
    )
    transferred = CounterMetricFamily(f"{PREFIX}_store_bytes", "bytes to and from the store", labels=["direction"])
    transferred.add_metric(["up"], store.get("put_bytes", 0))
    transferred.add_metric(["down"], store.get("get_range_bytes", 0))
    yield transferred
    yield CounterMetricFamily(
        f"{PREFIX}_store_copied_bytes",
        "bytes the store copied itself (no bytes through this node)",
        value=store.get("copied_bytes", 0),
    )

    yield GaugeMetricFamily(
        f"{PREFIX}_pending_operations",
        "store operations waiting or under way (uploads, moves, deletes)",
        value=stats["pending_ops"],
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_pending_upload_bytes", "bytes committed and not yet in the store", value=stats["pending_put_bytes"]
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_oldest_pending_operation_seconds",
        "age of the oldest store operation not yet done (0: none)",
        value=stats["oldest_pending_seconds"],
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_refused_operations",
        "operations the store refused for good (kept in the journal; `shufflefs journal`)",
        value=stats["refused_ops"],
    )
    cache = GaugeMetricFamily(
        f"{PREFIX}_cache_bytes", "bytes of local copies in the cache dir, by state", labels=["state"]
    )
    cache.add_metric(["waiting_for_upload"], stats["pending_put_bytes"])
    cache.add_metric(["stored_or_scratch"], max(0, stats["cached_bytes"] - stats["pending_put_bytes"]))
    yield cache
    yield GaugeMetricFamily(
        f"{PREFIX}_cache_size_bytes", "the cache dir's limit (--cache-size)", value=stats["cache_size"]
    )


def serve(host: str, port: int, collector: MountCollector):
    """Serve the metrics on host:port from now on (raises OSError if it cannot bind); returns
    the server, to shut down."""
    registry = CollectorRegistry()
    registry.register(collector)
    ProcessCollector(registry=registry)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
