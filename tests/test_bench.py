"""`shufflefs bench` and `shufflefs stats`: the benchmark runs Spark's pattern on a real mount,
counts what reached the store, catches wrong bytes, and refuses bad input in one line."""

from __future__ import annotations

import json
import os

import pytest

from shufflefs.bench import BenchError, ShuffleRun, Workload, bucket_of, java_string_hash
from shufflefs.testing.mounting import Mount, run_cli

SMALL = ["--mappers", "12", "--reducers", "5", "--block-size", "3000", "--pool-size", "3"]


def committed_bytes(mappers: int, reducers: int, block: int) -> int:
    """data + index ((R+1) longs) + checksum (R longs) of every map output"""
    return mappers * (reducers * block + 8 * (reducers + 1) + 8 * reducers)


def test_java_string_hash_and_spark_bucket():
    # values printed by java.lang.String.hashCode (OpenJDK 17)
    assert java_string_hash("") == 0
    assert java_string_hash("shuffle_0_0_0.data") == 581811660
    assert java_string_hash("shuffle_12_345_0.checksum.ADLER32") == -1689514645
    assert bucket_of("shuffle_0_0_0.data") == "%02x" % (581811660 % 64)
    assert bucket_of("shuffle_12_345_0.checksum.ADLER32") == "%02x" % (1689514645 % 64)


def test_bench_on_a_mount_counts_store_requests_and_compares(file_mount, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    result = run_cli("bench", file_mount.path, *SMALL, "--compare", str(plain), "--rounds", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    mount, reference = report["targets"]["dir"], report["targets"]["plain"]
    assert mount["shufflefs"] and not reference["shufflefs"]
    assert set(mount["phases"]) == {"write", "index", "read", "delete"} == set(report["ratios"])
    write = mount["phases"]["write"]
    assert len(write["seconds_runs"]) == 2
    # exactly the committed files reached the store: no temp file, no second copy
    assert write["store"]["put_bytes"] == committed_bytes(12, 5, 3000) == write["bytes"]
    assert write["store"]["put_requests"] == 36
    assert write["stored_seconds"] >= write["seconds"]
    # the writing node reads its index and data files without asking the store
    for phase in ("index", "read"):
        assert not any(k.startswith("get_range") for k in mount["phases"][phase]["store"]), mount["phases"][phase]
    assert mount["phases"]["delete"]["store"]["deleted_keys"] == 36
    assert mount["phases"]["read"]["bytes"] == 12 * 5 * (3000 + 16)
    assert reference["phases"]["write"]["store"] == {}
    # nothing left behind in either directory, nor in the store
    assert os.listdir(file_mount.path) == [] and os.listdir(plain) == []
    assert os.listdir(file_mount.store_root) == []


def test_bench_table_and_write_only(tmp_path):
    result = run_cli("bench", str(tmp_path), *SMALL, "--write-only")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("workload: 12 map outputs x 5 partitions x 3000 B")
    phases = [line.split()[0] for line in lines[3:] if line.split() and line.split()[1] == "dir"]
    assert phases == ["write", "delete"]
    assert os.listdir(tmp_path) == []


def test_bench_catches_bytes_that_read_back_wrong(tmp_path):
    run = ShuffleRun(str(tmp_path), Workload(mappers=3, reducers=4, block_size=5000, pool_size=2), "t")
    os.makedirs(run.blockmgr)
    write = run._timed("write", 3, run._in_parallel("write", run.write_map_output, 3, 60000, True))
    assert write.bytes == committed_bytes(3, 4, 5000)
    run._timed("read", 12, run._in_parallel("read", run.read_blocks, 4, 60000, True))  # intact: passes
    with open(run.path("shuffle_0_1_0.data"), "r+b") as f:
        f.seek(2 * 5000 + 17)
        f.write(b"\0")
    with pytest.raises(BenchError, match="block 2 of .*shuffle_0_1_0.data reads back different bytes"):
        run._timed("read", 12, run._in_parallel("read", run.read_blocks, 4, 60000, True))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/nonexistent-dir"], "DIR /nonexistent-dir is not a directory"),
        (["{tmp}", "--compare", "{tmp}"], "--compare must be another directory than DIR"),
        (["{tmp}", "--compare", "/nonexistent-dir"], "--compare /nonexistent-dir is not a directory"),
    ],
)
def test_bench_refuses_bad_input_in_one_line(tmp_path, args, needle):
    result = run_cli("bench", *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1
    assert result.stderr.strip() == f"shufflefs: error: {needle}"


@pytest.mark.parametrize("option", ["--mappers", "--block-size", "--pool-size"])
def test_bench_refuses_non_positive_sizes(tmp_path, option):
    result = run_cli("bench", str(tmp_path), option, "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert option in result.stderr.splitlines()[-1]


def test_bench_refuses_a_mount_as_plain_reference(file_mount, tmp_path):
    result = run_cli("bench", str(tmp_path), "--compare", file_mount.path)
    assert result.returncode == 1
    assert "is on a shufflefs mount; give a plain directory" in result.stderr


def test_stats_and_sync_wait_for_async_uploads(tmp_path, file_store):
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--commit", "async") as mount:
        os.makedirs(os.path.join(mount.path, "d"))
        for i in range(20):  # half written under their final name, half renamed into it
            final = os.path.join(mount.path, "d", f"shuffle_0_{i}_0.data")
            with open(final + (".tmp" if i % 2 else ""), "wb") as f:
                f.write(os.urandom(100_000))
            if i % 2:  # async mode gets no FLUSH: this commit happens at RELEASE
                os.rename(final + ".tmp", final)
        result = run_cli("stats", os.path.join(mount.path, "d"), "--sync")
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        assert stats["pending_ops"] == 0 and stats["pending_put_bytes"] == 0
        assert stats["store"]["put_requests"] == 20 and stats["store"]["put_bytes"] == 2_000_000
        assert len(os.listdir(os.path.join(file_store, "d"))) == 20
        assert stats["commit"] == "async" and stats["store_url"] == f"file://{file_store}"
        assert 0 < stats["rss_bytes"] <= stats["peak_rss_bytes"]


def test_stats_refuses_a_path_outside_any_mount(tmp_path):
    result = run_cli("stats", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"shufflefs: error: {tmp_path} is not on a shufflefs mount"
