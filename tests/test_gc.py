"""`shufflefs gc` and the heartbeats it trusts (docs/GC.md): what a mount holds, what a run
finds and removes (the file store, with crafted ages; real mounts on SeaweedFS, one crashed and
one live), and bad input."""

from __future__ import annotations

import json
import math
import os
import time
import uuid

import pytest
import trio

from shufflefs import gc
from shufflefs.callers import Executor
from shufflefs.heartbeat import MOUNTS, Heartbeat, held, keep
from shufflefs.stores.file import TEMP_PREFIX, FileStore
from shufflefs.stores.memory import MemoryStore
from shufflefs.testing.mounting import Mount, bucket_objects, run_cli

DAY = 86400.0
LIVE, DEAD = Executor("app-1", "1", 100, 1), Executor("app-1", "2", 200, 2)


def bm() -> str:
    return f"blockmgr-{uuid.uuid4()}"


def alive(executor: Executor) -> bool:
    return executor == LIVE


# ---------------------------------------------------------------------------- what a mount holds
def test_a_mount_holds_its_block_managers_until_their_executors_and_adopters_are_dead():
    made_by_a_person, live, dead, adopted = (f"spark-1/{bm()}" for _ in range(4))
    dirs = [
        ("spark-1", {}),
        (made_by_a_person, {}),
        (f"{made_by_a_person}/0c", {}),
        (live, {"executor": LIVE.record()}),
        (dead, {"executor": DEAD.record()}),
        (adopted, {"executor": DEAD.record(), "adopter": LIVE.record()}),
    ]
    released: dict[str, float] = {}
    assert held(dirs, alive, released, now=1000.0) == {made_by_a_person: None, live: None, dead: 1000.0, adopted: None}
    # released stays when it was first seen; a directory gone is forgotten
    assert held(dirs[:5], alive, released, now=2000.0)[dead] == 1000.0
    assert held(dirs[:4], alive, released, now=3000.0) == {made_by_a_person: None, live: None}
    assert released == {}


async def test_a_heartbeat_is_written_while_something_is_held_and_withdrawn_after(tmp_path, autojump_clock):
    store = MemoryStore()
    beat = Heartbeat(store, "instance-1", str(tmp_path), every=60)
    dirs: list[tuple[str, dict]] = []

    async def call(fn, *args, what=""):
        return fn(*args)

    def record() -> dict | None:
        info = store.head(beat.key)
        return None if info is None else json.loads(store.get_range(beat.key, 0, info.size))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep, beat, lambda: list(dirs), alive, call)
        await trio.sleep(1)
        assert store.list_dir(MOUNTS).files == []  # nothing held: no request
        directory = f"spark-1/{bm()}"
        dirs.append((directory, {"executor": LIVE.record()}))
        await trio.sleep(60)
        first = record()
        assert first["holds"] == {directory: None} and first["every"] == 60
        await trio.sleep(60)
        assert record()["renewed"] > first["renewed"]
        dirs.clear()
        await trio.sleep(60)
        assert record() is None and not beat.written
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- what a run removes
class Layout:
    """A file store with objects, heartbeats and registry records of chosen ages."""

    def __init__(self, root):
        self.root = str(root)
        self.store = FileStore(self.root)
        self.now = time.time()

    def object(self, key: str, age: float, body: bytes = b"x" * 10) -> str:
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)
        os.utime(path, (self.now - age, self.now - age))
        return key

    def heartbeat(self, instance: str, renewed_age: float, holds: dict[str, float | None]) -> str:
        record = {"renewed": self.now - renewed_age, "every": 60, "holds": holds}
        return self.object(f"{MOUNTS}/{instance}", renewed_age, json.dumps(record).encode())

    def keys(self) -> set[str]:
        return {os.path.relpath(os.path.join(d, n), self.root) for d, _, names in os.walk(self.root) for n in names}


def garbage_keys(planned: gc.Plan) -> set[str]:
    return {item.key for item in planned.garbage}


def test_a_run_collects_exactly_what_no_live_mount_holds_and_nobody_wrote_lately(tmp_path):
    layout = Layout(tmp_path)
    held_dir, unheld, young, stale_held, released_long_ago, released_lately = (f"spark-1/{bm()}" for _ in range(6))
    for directory in (held_dir, unheld, stale_held, released_long_ago, released_lately):
        layout.object(f"{directory}/0c/shuffle_0_0_0.data", 3 * DAY)
        layout.object(f"{directory}/0d/shuffle_0_0_0.index", 2 * DAY)
    layout.object(f"{young}/0c/shuffle_0_0_0.data", 3 * DAY)
    layout.object(f"{young}/0d/shuffle_0_0_0.index", 60)
    outside = layout.object("fallback/app-1/0/shuffle_0_0_0.data", 5 * DAY)
    live_beat = layout.heartbeat(
        "live", 30, {held_dir: None, released_long_ago: layout.now - 2 * DAY, released_lately: layout.now - 3600}
    )
    stale_beat = layout.heartbeat("crashed", 2 * DAY, {stale_held: None})
    records = {
        name: layout.object(f".shufflefs/dirs/app-1/{os.path.basename(name)}", 3 * DAY)
        for name in (held_dir, unheld, young)
    }
    lost_node = layout.object(".shufflefs/nodes/lost-node", 2 * DAY)
    live_node = layout.object(".shufflefs/nodes/live-node", 5)
    old_temp = layout.object(f"{unheld}/0c/{TEMP_PREFIX}{'a' * 32}", 2 * DAY)
    layout.object(f"{held_dir}/0c/{TEMP_PREFIX}{'b' * 32}", 10)  # a write in progress

    holders = gc.Holders(layout.store, DAY)
    planned = gc.plan(layout.store, DAY, holders)
    assert garbage_keys(planned) == {
        unheld,
        stale_held,
        released_long_ago,
        old_temp,
        stale_beat,
        records[unheld],
        lost_node,
    }
    assert {item.key: item.reason.split()[0] for item in planned.kept} == {
        held_dir: "held",
        released_lately: "held",
        young: "written",
    }
    assert (planned.outside_objects, planned.live_mounts) == (1, 1)
    assert next(i for i in planned.garbage if i.key == unheld).objects == 2  # the temp file is counted apart

    before = layout.keys()
    outcome = gc.delete(layout.store, planned, holders, lambda count: None)
    assert not outcome.failed and not outcome.spared
    gone = before - layout.keys()
    assert gone == {key for key in before if key.startswith((unheld, stale_held, released_long_ago))} | {
        stale_beat,
        records[unheld],
        lost_node,
    }
    assert {outside, live_beat, live_node, records[held_dir], records[young]} <= layout.keys()
    again = gc.plan(layout.store, DAY, gc.Holders(layout.store, DAY))
    assert again.garbage == []


def test_a_directory_held_or_written_to_after_the_plan_is_spared_with_its_records(tmp_path):
    layout = Layout(tmp_path)
    taken, written = f"spark-1/{bm()}", f"spark-1/{bm()}"
    for directory in (taken, written):
        layout.object(f"{directory}/0c/shuffle_0_0_0.data", 2 * DAY)
    record = layout.object(f".shufflefs/claims/app-1/{os.path.basename(taken)}", 2 * DAY)
    holders = gc.Holders(layout.store, DAY)
    planned = gc.plan(layout.store, DAY, holders)
    assert garbage_keys(planned) == {taken, written, record}
    layout.heartbeat("late", 1, {taken: None})
    layout.object(f"{written}/0d/shuffle_0_0_0.index", 0)
    holders.read_at = -math.inf  # as after HEARTBEATS_FRESH
    outcome = gc.delete(layout.store, planned, holders, lambda count: None)
    assert {item.key for item in outcome.spared} == {taken, written, record} and outcome.removed == []
    assert f"{taken}/0c/shuffle_0_0_0.data" in layout.keys() and record in layout.keys()


def test_a_heartbeat_that_is_not_one_stops_the_run(tmp_path):
    layout = Layout(tmp_path)
    layout.object(f"{MOUNTS}/x", 5, b"not json")
    result = run_cli("gc", f"file://{layout.root}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "is not a shufflefs record; nothing is collected" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["gc", "nope://x"], "unsupported store URL scheme 'nope'"),
        (["gc", "file:///nonexistent-store"], "does not exist"),
        (["gc", "file:///tmp", "--older-than", "5"], "invalid duration '5'"),
        (["gc", "file:///tmp", "--older-than", "a day"], "invalid duration"),
    ],
)
def test_bad_input_is_one_line_and_a_failure(args, message):
    result = run_cli(*args)
    assert result.returncode in (1, 2) and result.stdout == ""
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_an_unreachable_store_is_one_line(s3_env):
    result = run_cli("gc", "s3://bucket", "--s3-endpoint-url", "http://127.0.0.1:9", env=s3_env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- real mounts, S3
def test_gc_removes_a_crashed_mounts_tree_and_an_abandoned_upload_and_never_a_live_mounts(
    tmp_path, seaweed, s3_env, bucket
):
    url = f"s3://{bucket}/pre"
    endpoint = ["--s3-endpoint-url", seaweed.endpoint_url]
    client = seaweed.client()
    crashed_dir, live_dir = f"spark-{uuid.uuid4()}/{bm()}", f"spark-{uuid.uuid4()}/{bm()}"
    files = {
        f"{directory}/{sub}/shuffle_0_{n}_0.{kind}": os.urandom(1000 + n)
        for directory in (crashed_dir, live_dir)
        for n, (sub, kind) in enumerate([("0c", "data"), ("1f", "index")])
    }

    def write_files(mount: Mount, directory: str) -> None:
        for key, body in files.items():
            if key.startswith(directory):
                os.makedirs(os.path.join(mount.path, os.path.dirname(key)), exist_ok=True)
                with open(os.path.join(mount.path, key), "wb") as f:
                    f.write(body)

    def heartbeats() -> dict[str, dict]:
        return {
            key: json.loads(body)
            for key, body in bucket_objects(client, bucket, "pre", records=True).items()
            if key.startswith(MOUNTS)
        }

    def wait_held(directory: str) -> None:
        deadline = time.monotonic() + 30
        while not any(directory in beat["holds"] for beat in heartbeats().values()):
            assert time.monotonic() < deadline, f"no heartbeat holds {directory}"
            time.sleep(0.2)

    crashed = Mount(url, tmp_path / "crashed", tmp_path / "crashed-cache", *endpoint, "--heartbeat", "1", env=s3_env)
    with crashed:
        write_files(crashed, crashed_dir)
        wait_held(crashed_dir)
        crashed.kill()  # its application never cleans up
    (crashed_beat,) = heartbeats()
    upload = client.create_multipart_upload(Bucket=bucket, Key=f"pre/{crashed_dir}/0c/shuffle_1_0_0.data")
    client.upload_part(
        Bucket=bucket,
        Key=f"pre/{crashed_dir}/0c/shuffle_1_0_0.data",
        PartNumber=1,
        UploadId=upload["UploadId"],
        Body=b"p" * 1000,
    )
    with Mount(url, tmp_path / "live", tmp_path / "live-cache", *endpoint, "--heartbeat", "1", env=s3_env) as live:
        write_files(live, live_dir)
        wait_held(live_dir)
        time.sleep(3.5)  # --older-than 3s: the crashed mount's heartbeat and every file are older

        dry = run_cli("gc", url, "--older-than", "3s", "--json", *endpoint, env=s3_env)
        assert dry.returncode == 0, dry.stderr
        found = json.loads(dry.stdout)
        assert {(item["kind"], item["key"]) for item in found["garbage"]} == {
            (gc.DIRECTORY, crashed_dir),
            (gc.UNFINISHED, f"{crashed_dir}/0c/shuffle_1_0_0.data"),
            (gc.RECORD, crashed_beat),
        }
        assert [(item["key"], item["reason"].split()[0]) for item in found["kept"]] == [(live_dir, "held")]
        assert set(bucket_objects(client, bucket, "pre", records=True)) == set(files) | {crashed_beat, *heartbeats()}

        text = run_cli("gc", url, "--older-than", "3s", *endpoint, env=s3_env)
        assert text.returncode == 0 and "Dry run" in text.stdout and crashed_dir in text.stdout

        deleted = run_cli("gc", url, "--older-than", "3s", "--delete", *endpoint, env=s3_env)
        assert deleted.returncode == 0, deleted.stderr
        assert "Deleted" in deleted.stdout and deleted.stderr == ""  # no progress bar without a terminal
        assert set(bucket_objects(client, bucket, "pre")) == {k for k in files if k.startswith(live_dir)}
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
        for key, body in files.items():
            if key.startswith(live_dir):
                with open(os.path.join(live.path, key), "rb") as f:
                    assert f.read() == body

        again = run_cli("gc", url, "--older-than", "3s", "--json", *endpoint, env=s3_env)
        assert json.loads(again.stdout)["garbage"] == []
        assert live.umount().returncode == 0
    assert heartbeats() == {}  # a clean unmount withdraws its heartbeat
