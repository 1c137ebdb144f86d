"""Layer 4: real PySpark jobs (local-cluster: real executor JVMs) with spark.local.dir on a
shufflefs mount, compared with the same job on a plain directory, and the store checked while
Spark still holds its shuffle files."""

from __future__ import annotations

import json
import os
import time

import pytest

from shufflefs.naming import is_durable
from shufflefs.testing.mounting import Mount, bucket_objects, daos_objects, run_cli, store_objects
from shufflefs.testing.sparkrun import run_spark_job, shuffle_files

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def plain_result(tmp_path_factory):
    """The job on a plain local directory: the results every mount must reproduce."""
    base = tmp_path_factory.mktemp("plain")
    (base / "local").mkdir()
    return run_spark_job(base / "local", base / "result.json")


def check_store_mirrors_mount(mount_path: str, objects_now, wait: float = 0) -> int:
    """Every committed shuffle file under the mount has an object with identical bytes at its
    path key, and no object has a scratch name. Async commits get `wait` seconds to land."""
    files = shuffle_files(mount_path)
    assert len(files) > 10, "the job left fewer shuffle files than expected"
    expected = {}
    for path in files:
        with open(path, "rb") as f:
            expected[os.path.relpath(path, mount_path)] = f.read()
    deadline = time.monotonic() + wait
    while True:
        objects = objects_now()
        missing = [key for key, data in expected.items() if objects.get(key) != data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, f"{len(missing)} of {len(expected)} shuffle files have no identical object, e.g. {missing[:3]}"
    # (shufflefs' own records, shufflefs.registry, are not files of the mount)
    scratch = [key for key in objects if not is_durable(os.path.basename(key)) and not key.startswith(".shufflefs/")]
    assert not scratch, f"scratch files reached the store: {scratch[:5]}"
    return len(expected)


def check_show_decodes_what_spark_wrote(mount_path: str, sample: int = 4) -> None:
    """`shufflefs show` of the biggest index files Spark wrote: every partition's range lies in
    the data file (found in whatever subdirectory its name hashed to), and matches Spark's own
    checksum of it."""
    indexes = sorted((f for f in shuffle_files(mount_path) if f.endswith(".index")), key=os.path.getsize)[-sample:]
    for index in indexes:
        result = run_cli("show", index, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["problems"] == [] and report["algorithm"] == "ADLER32", report
        assert len(report["partitions"]) == os.path.getsize(index) // 8 - 1
        assert sum(p["length"] for p in report["partitions"]) == report["data_bytes"] == os.path.getsize(report["data"])
        assert all(p["checksum_ok"] for p in report["partitions"])


def block_manager_dir(path: str, mount_path: str) -> str:
    """The block manager directory (relative to the mount) a shuffle file is in."""
    parts = os.path.relpath(path, mount_path).split(os.sep)
    holder = next(i for i, part in enumerate(parts) if part.startswith("blockmgr-"))
    return "/".join(parts[: holder + 1])


def check_ls_lists_what_spark_wrote(mount_path: str, store_url: str, env: dict) -> None:
    """`shufflefs ls` of the mount and of the store without mounting: per block manager
    directory and shuffle, exactly the map outputs (index files) and bytes Spark wrote."""
    expected: dict[tuple[str, int], list[int]] = {}
    for path in shuffle_files(mount_path):
        name = os.path.basename(path)
        counts = expected.setdefault((block_manager_dir(path, mount_path), int(name.split("_")[1])), [0, 0, 0])
        counts[0] += name.endswith(".index")
        counts[1] += 1
        counts[2] += os.path.getsize(path)
    for target in (mount_path, store_url):
        result = run_cli("ls", target, "--json", env=env)
        assert result.returncode == 0, result.stderr
        listed = json.loads(result.stdout)
        assert not listed["truncated"]
        assert {
            (s["block_manager"], s["shuffle"]): [s["map_outputs"], s["files"], s["bytes"]] for s in listed["shuffles"]
        } == expected, target
        if target == mount_path:  # a sync commit: nothing waits for the store
            assert {s["pending_files"] for s in listed["shuffles"]} == {0}


def check_gc_keeps_what_live_executors_hold(mount_path: str, store_url: str, env: dict) -> None:
    """`shufflefs gc` while the job's executors live: every block manager directory they wrote
    is held by the mount's heartbeat (renewed every second here), however short --older-than;
    nothing is garbage."""
    written = {block_manager_dir(path, mount_path) for path in shuffle_files(mount_path)}
    deadline = time.monotonic() + 30
    while True:
        result = run_cli("gc", store_url, "--older-than", "1s", "--json", env=env)
        assert result.returncode == 0, result.stderr
        found = json.loads(result.stdout)
        kept = {item["key"]: item["reason"].split()[0] for item in found["kept"]}
        if kept == dict.fromkeys(written, "held") or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # the first renewal that names them
    assert kept == dict.fromkeys(written, "held") and found["garbage"] == [] and found["live_mounts"] == 1


def test_spark_job_on_s3_mount(tmp_path, plain_result, s3_env, bucket, seaweed):
    client = seaweed.client()
    checked = []

    def while_spark_holds_its_files() -> None:
        checked.append(check_store_mirrors_mount(mount.path, lambda: bucket_objects(client, bucket, "shuffle")))
        check_show_decodes_what_spark_wrote(mount.path)
        check_ls_lists_what_spark_wrote(mount.path, f"s3://{bucket}/shuffle", {**os.environ, **s3_env})
        check_gc_keeps_what_live_executors_hold(mount.path, f"s3://{bucket}/shuffle", {**os.environ, **s3_env})

    with Mount(f"s3://{bucket}/shuffle", tmp_path / "mnt", tmp_path / "cache", "--heartbeat", "1", env=s3_env) as mount:
        result = run_spark_job(mount.path, tmp_path / "result.json", pause_callback=while_spark_holds_its_files)
        assert result == plain_result
        assert checked and checked[0] > 10
        assert mount.umount().returncode == 0
        stats = mount.status()["stats"]
        assert stats.get("failed_requests", 0) == 0
    print(f"s3: {checked[0]} shuffle files mirrored; store requests {stats}")


def test_spark_job_on_file_mount_async(tmp_path, plain_result, file_store):
    checked = []
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--commit", "async") as mount:
        result = run_spark_job(
            mount.path,
            tmp_path / "result.json",
            pause_callback=lambda: checked.append(
                check_store_mirrors_mount(mount.path, lambda: store_objects(str(file_store)), wait=60)
            ),
        )
        assert result == plain_result
        assert checked and checked[0] > 10
        assert mount.umount().returncode == 0
    # Spark deleted its shuffle files at exit: their objects went with them
    leftover = store_objects(str(file_store))
    assert not leftover, f"{len(leftover)} objects of deleted shuffle files remain"


@pytest.mark.daos
def test_spark_job_on_daos_mount(tmp_path, plain_result, daos):
    url = daos.url("shuffle")
    checked = []
    with Mount(url, tmp_path / "mnt", tmp_path / "cache", env=daos.env) as mount:
        result = run_spark_job(
            mount.path,
            tmp_path / "result.json",
            pause_callback=lambda: checked.append(check_store_mirrors_mount(mount.path, lambda: daos_objects(url))),
        )
        assert result == plain_result
        assert checked and checked[0] > 10
        assert mount.umount().returncode == 0
        stats = mount.status()["stats"]
        assert stats.get("failed_requests", 0) == 0
    leftover = daos_objects(url)
    assert not leftover, f"{len(leftover)} files of deleted shuffle files remain"
    print(f"daos: {checked[0]} shuffle files mirrored; store requests {stats}")
