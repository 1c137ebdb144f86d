"""Prometheus metrics of a real mount (--metrics-addr; shufflefs.metrics): scraped over HTTP while
files are written and read, they move and agree with `shufflefs stats`; a taken port or a
malformed address is refused in one line before anything is mounted."""

from __future__ import annotations

import json
import os
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shufflefs.testing.mounting import Mount, is_mounted, run_cli
from shufflefs.testing.servers import free_port

BLOCK_MANAGER = "blockmgr-10000000-0000-4000-8000-000000000000"


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted labels: value}} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def commit_files(root: str, count: int, size: int) -> None:
    directory = os.path.join(root, BLOCK_MANAGER, "0c")
    os.makedirs(directory, exist_ok=True)
    for n in range(count):
        path = os.path.join(directory, f"shuffle_0_{n}_0.data")
        with open(path + ".tmp", "wb") as f:
            f.write(os.urandom(size))
        os.rename(path + ".tmp", path)
        with open(path, "rb") as f:
            assert len(f.read()) == size


def test_metrics_move_with_a_workload_and_match_stats(tmp_path, file_store):
    port = free_port()
    with Mount(
        f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--metrics-addr", f"127.0.0.1:{port}"
    ) as mount:
        before = scrape(port)
        commit_files(mount.path, 10, 100_000)
        stats = json.loads(run_cli("stats", mount.path, "--sync").stdout)
        after = scrape(port)

    def value(samples, name, **labels) -> float:
        return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    assert (
        value(after, "shufflefs_fuse_requests_total", kind="create")
        - value(before, "shufflefs_fuse_requests_total", kind="create")
        == 10
    )
    assert value(after, "shufflefs_fuse_requests_total", kind="rename") >= 10
    # every request answered is in the latency histogram of its kind
    for kind in ("create", "rename"):  # (writes are passed through: no WRITE request)
        assert value(after, "shufflefs_fuse_request_seconds_count", kind=kind) >= 10
        assert value(after, "shufflefs_fuse_request_seconds_bucket", kind=kind, le="+Inf") == value(
            after, "shufflefs_fuse_request_seconds_count", kind=kind
        )
        assert value(after, "shufflefs_fuse_request_seconds_sum", kind=kind) > 0
    # the store's counters are the ones `shufflefs stats` reports
    assert value(after, "shufflefs_store_requests_total", kind="put") == stats["store"]["put_requests"] == 10
    assert value(after, "shufflefs_store_bytes_total", direction="up") == stats["store"]["put_bytes"] == 1_000_000
    assert value(after, "shufflefs_pending_operations") == stats["pending_ops"] == 0
    assert value(after, "shufflefs_cache_size_bytes") == stats["cache_size"]
    info = next(iter(after["shufflefs_mount_info"]))
    assert dict(info)["commit"] == "sync" and dict(info)["store"] == f"file://{file_store}"
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_cpu_seconds_total") > 0


def test_a_taken_metrics_port_is_refused_before_mounting(tmp_path, file_store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mountpoint = tmp_path / "mnt"
        mountpoint.mkdir()
        result = run_cli(
            "mount",
            f"file://{file_store}",
            str(mountpoint),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--metrics-addr",
            f"127.0.0.1:{port}",
        )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"shufflefs: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ], result.stderr
    assert not is_mounted(str(mountpoint))


@pytest.mark.parametrize("address", ["nonsense", "host:", "127.0.0.1:70000", "127.0.0.1:0"])
def test_a_malformed_metrics_address_is_refused_in_one_line(tmp_path, file_store, address):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli("mount", f"file://{file_store}", str(mountpoint), "--metrics-addr", address)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "invalid metrics address" in result.stderr, result.stderr
    assert not is_mounted(str(mountpoint))
