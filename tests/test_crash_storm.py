"""Crash loops: unlink/rename/replace storms in async mode, with the daemon SIGKILLed at a random
moment in every round and started again with the same cache dir (the adversarial finding "1
unlinked file of 20 kills came back, in the bucket and on the mount after restart").

Against SeaweedFS the daemon talks through the fault proxy: write requests are delayed (so a
kill lands while they are in flight, and the proxy still forwards them after the daemon died:
late requests) or held (released only after the next daemon started and did its work). A model
(name -> bytes) says what the namespace must hold: every file whose commit returned exists with
its last bytes, every unlinked file is gone. At the end the daemon drains, the late window
passes, and the store and a fresh mount must hold exactly the model.

The seed is printed; replay a failure with SHUFFLEFS_STORM_SEED=<seed> (and
SHUFFLEFS_STORM_ROUNDS=<n> to run more rounds).
"""

from __future__ import annotations

import os
import random
import time
import uuid

import pytest

from shufflefs.testing.faultproxy import FaultProxy, delay, hold
from shufflefs.testing.mounting import Mount, bucket_objects, run_cli, store_objects

SEED = int(os.environ.get("SHUFFLEFS_STORM_SEED", "20261201"))
ROUNDS = int(os.environ.get("SHUFFLEFS_STORM_ROUNDS", "14"))
DIRS = (
    "blockmgr-00000000-0000-4000-8000-000000000000/00",
    "blockmgr-00000000-0000-4000-8000-000000000000/01",
    "blockmgr-10000000-0000-4000-8000-000000000000/00",
)
#: write requests (what a late request can be)
WRITES = ("PutObject", "CopyObject", "DeleteObject", "DeleteObjects", "CompleteMultipartUpload")


class Storm:
    """The namespace model and the operations on a live mount."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.model: dict[str, bytes] = {}  # key (relative to the mount) -> bytes
        self.gone: set[str] = set()  # keys unlinked or moved away: reused by later commits
        self.events: list[str] = []
        self._next = 0
        self.round = 0

    def note(self, text: str) -> None:
        self.events.append(f"round {self.round}: {text}")

    def fresh_key(self) -> str:
        self._next += 1
        suffix = self.rng.choice((".data", ".data", ".index", ".checksum.ADLER32"))
        return f"{self.rng.choice(DIRS)}/shuffle_{self.round}_{self._next}_0{suffix}"

    def payload(self) -> bytes:
        return os.urandom(self.rng.choice((1, 100, 3000, 40000)))

    def commit(self, root: str, key: str, data: bytes) -> None:
        """Like Spark: a temporary name, then a rename into the final (durable) name."""
        final = f"{root}/{key}"
        temp = f"{final}.{uuid.uuid4().hex[:8]}"
        with open(temp, "wb") as f:
            f.write(data)
        os.rename(temp, final)
        self.model[key] = data
        self.gone.discard(key)

    def step(self, root: str) -> None:
        """One random operation; the model changes only once the system call returned."""
        choice = self.rng.random()
        keys = sorted(self.model)
        if choice < 0.35 or len(keys) < 3:
            key = self.fresh_key()
            self.note(f"commit {key}")
            self.commit(root, key, self.payload())
        elif choice < 0.55:
            key = self.rng.choice(keys)
            self.note(f"unlink {key}")
            os.unlink(f"{root}/{key}")
            del self.model[key]
            self.gone.add(key)
        elif choice < 0.70:
            src = self.rng.choice(keys)
            if self.rng.random() < 0.25:
                dst = self.rng.choice(keys)  # over another committed file
            elif self.gone and self.rng.random() < 0.3:
                dst = self.rng.choice(sorted(self.gone))
            else:
                dst = self.fresh_key()
            if dst == src:
                return
            self.note(f"move {src} -> {dst}")
            os.rename(f"{root}/{src}", f"{root}/{dst}")
            self.model[dst] = self.model.pop(src)
            self.gone.add(src)
            self.gone.discard(dst)
        elif choice < 0.85:
            key = self.rng.choice(keys)
            self.note(f"replace {key}")
            self.commit(root, key, self.payload())
        elif self.gone:
            key = self.rng.choice(sorted(self.gone))
            self.note(f"commit again {key}")
            self.commit(root, key, self.payload())

    def unlink_key(self, root: str, key: str) -> None:
        if key in self.model:
            self.note(f"unlink {key} (its late request is still to come)")
            os.unlink(f"{root}/{key}")
            del self.model[key]
            self.gone.discard(key)  # not reused: a late PUT that resurrects it stays visible

    def check_mount(self, root: str, exact: bool) -> list[str]:
        """Differences between the mount and the model (every model file with its bytes; with
        `exact`, no other file)."""
        problems = []
        for key, data in sorted(self.model.items()):
            try:
                with open(f"{root}/{key}", "rb") as f:
                    found = f.read()
            except OSError as exc:
                problems.append(f"{key}: missing on the mount ({exc})")
                continue
            if found != data:
                problems.append(f"{key}: {len(found)} bytes on the mount, expected {len(data)} (stale bytes)")
        if exact:
            listed = set()
            for directory, _, files in os.walk(root):
                listed.update(os.path.relpath(os.path.join(directory, n), root) for n in files)
            problems += [f"{key}: on the mount, but unlinked (resurrected)" for key in sorted(listed - set(self.model))]
        return problems

    def diff(self, objects: dict[str, bytes], where: str) -> list[str]:
        problems = []
        for key in sorted(set(objects) | set(self.model)):
            if key not in objects:
                problems.append(f"{key}: missing in the {where}")
            elif key not in self.model:
                problems.append(f"{key}: in the {where}, but unlinked or moved away (resurrected)")
            elif objects[key] != self.model[key]:
                problems.append(
                    f"{key}: stale bytes in the {where} ({len(objects[key])} bytes, expected {len(self.model[key])})"
                )
        return problems

    def report(self, problems: list[str], mount: Mount, seed: int) -> str:
        keys = {p.split(":")[0] for p in problems}
        history = [e for e in self.events if any(k in e for k in keys)]
        log = [
            line
            for line in full_log(mount).splitlines()
            if any(k in line for k in keys) or "resumed" in line or "removing" in line
        ]
        return (
            f"seed {seed}: "
            + "; ".join(problems)
            + "\nhistory of those keys:\n  "
            + "\n  ".join(history)
            + "\ndaemon log lines about them:\n  "
            + "\n  ".join(log[-60:])
        )


def full_log(mount: Mount) -> str:
    try:
        with open(os.path.join(mount.cache_dir, "shufflefs.log")) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def settle(mount: Mount) -> None:
    result = run_cli("stats", mount.path, "--sync", "--timeout", "60", env=mount.env)
    assert result.returncode == 0, f"{result.stderr}\n{mount.log()}"


def run_round_ops(storm: Storm, root: str, count: int) -> None:
    for _ in range(count):
        storm.step(root)


# ---------------------------------------------------------------------------------- s3


@pytest.fixture
def proxy(seaweed):
    with FaultProxy(seaweed.endpoint_url) as p:
        yield p


def test_crash_storm_s3_with_late_requests(seaweed, proxy, s3_env, tmp_path):
    seed = SEED
    print(f"crash storm seed {seed}, {ROUNDS} rounds (replay: SHUFFLEFS_STORM_SEED={seed})")
    rng = random.Random(seed)
    storm = Storm(rng)
    bucket = seaweed.create_bucket(f"storm{uuid.uuid4().hex[:12]}")
    late_window = 5.0
    args = ("--s3-endpoint-url", proxy.url, "--commit", "async", "--late-window", str(late_window))
    mount = Mount(f"s3://{bucket}", tmp_path / "mnt", tmp_path / "cache", *args, env=s3_env)
    #: requests held by the proxy from killed daemons: (request, round to release it in,
    #: when its daemon was killed)
    held: list = []
    released = dropped = delayed_rounds = 0
    last_kill = 0.0
    seen: set[int] = set()
    started = time.monotonic()
    try:
        for storm.round in range(ROUNDS + 1):
            final = storm.round == ROUNDS
            mount.start()
            root = mount.path
            if storm.round == 0:
                for d in DIRS:
                    os.makedirs(f"{root}/{d}")
            # the next daemon does its work (the dead daemon's journal, new operations; files
            # whose PUT is still held are unlinked) ...
            for h, _, killed_at in held:
                key = h.request.path.lstrip("/").partition("/")[2]
                if h.request.op == "PutObject" and killed_at == last_kill and rng.random() < 0.8:
                    storm.unlink_key(root, key)
            run_round_ops(storm, root, rng.randint(2, 5))
            settle(mount)
            problems = storm.check_mount(root, exact=False)
            assert not problems, storm.report(problems, mount, seed)
            # ... and only then do the dead daemons' held requests reach the store (after the
            # next daemon, sometimes after the one after it; within the late window of their
            # daemon's death: the window is how late a request may be applied)
            for entry in [e for e in held if e[1] <= storm.round or final]:
                h, _, killed_at = entry
                held.remove(entry)
                if time.monotonic() - killed_at < late_window * 0.6:
                    status = proxy.release(h)
                    storm.note(f"released late {h.request.op} {h.request.path}: {status}")
                    released += 1
                else:  # the proxy drops it when it stops
                    storm.note(f"dropped {h.request.op} {h.request.path} (too late to release)")
                    dropped += 1
            if final:
                break
            # this round's faults: slow write requests, sometimes one held until the next round
            holding = rng.random() < 0.7
            if holding:  # the first matching rule decides: this one before the delays
                proxy.add_rule(
                    hold(),
                    op=rng.choice(
                        ("PutObject", "PutObject", "PutObject", "DeleteObjects", "CopyObject", "DeleteObject")
                    ),
                    times=1,
                )
            if rng.random() < 0.6:
                delayed_rounds += 1
                proxy.add_rule(delay(rng.uniform(0.1, 0.8)), op=WRITES, probability=0.6, seed=rng.randrange(1 << 30))
            run_round_ops(storm, root, rng.randint(4, 10))
            if holding:
                try:
                    proxy.wait_held(timeout=1.0)
                except TimeoutError:
                    pass
            for h in proxy.held():  # a file whose PUT is in flight is unlinked by this daemon
                if h.request.op == "PutObject" and rng.random() < 0.6:
                    storm.unlink_key(root, h.request.path.lstrip("/").partition("/")[2])
            time.sleep(rng.uniform(0, 0.4))
            storm.note("SIGKILL")
            mount.kill()
            last_kill = time.monotonic()
            proxy.clear_rules()
            for h in proxy.held():
                if id(h) not in seen:
                    seen.add(id(h))
                    held.append((h, storm.round + rng.choice((1, 1, 2)), last_kill))

        # the end: everything settles, late requests have had their window, the daemon drains
        settle(mount)
        time.sleep(late_window + 1)
        settle(mount)
        problems = storm.check_mount(mount.path, exact=True)
        result = mount.umount()
        assert result.returncode == 0, f"umount: {result.stderr}\n{mount.log()}"
        journal = run_cli("journal", mount.cache_dir, env=s3_env)
        print(f"journal after the drain:\n{journal.stdout}")
        problems += storm.diff(bucket_objects(seaweed.client(), bucket), "bucket")
        assert not problems, storm.report(problems, mount, seed)
        with Mount(f"s3://{bucket}", tmp_path / "fresh", tmp_path / "cache-fresh", *args, env=s3_env) as fresh:
            problems = storm.check_mount(fresh.path, exact=True)
            assert not problems, storm.report(problems, mount, seed)
            assert fresh.umount().returncode == 0
    finally:
        mount.cleanup()
    print("\n".join(e for e in storm.events if os.environ.get("STORM_ALL") or "late" in e or "dropped" in e))
    print(
        f"{ROUNDS} rounds, {len(storm.model)} files at the end, {released} late requests released, "
        f"{dropped} dropped, {delayed_rounds} rounds with slow writes, {time.monotonic() - started:.1f} s"
    )


# ---------------------------------------------------------------------------------- file://


def test_crash_storm_file_store(file_store, tmp_path):
    seed = SEED + 1
    rounds = ROUNDS
    print(f"crash storm (file://) seed {seed}, {rounds} rounds (replay: SHUFFLEFS_STORM_SEED={seed - 1})")
    rng = random.Random(seed)
    storm = Storm(rng)
    mount = Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache", "--commit", "async")
    started = time.monotonic()
    try:
        for storm.round in range(rounds + 1):
            mount.start()
            if storm.round == 0:
                for d in DIRS:
                    os.makedirs(f"{mount.path}/{d}")
            run_round_ops(storm, mount.path, rng.randint(2, 5))
            settle(mount)
            problems = storm.check_mount(mount.path, exact=False)
            assert not problems, storm.report(problems, mount, seed)
            if storm.round == rounds:
                break
            run_round_ops(storm, mount.path, rng.randint(4, 12))
            time.sleep(rng.uniform(0, 0.05))
            storm.note("SIGKILL")
            mount.kill()
        problems = storm.check_mount(mount.path, exact=True)
        result = mount.umount()
        assert result.returncode == 0, f"umount: {result.stderr}\n{mount.log()}"
        objects = store_objects(str(file_store))
        temps = [k for k in objects if os.path.basename(k).startswith(".shufflefs-tmp-")]
        problems += [f"{k}: temporary file left in the store" for k in temps]
        problems += storm.diff({k: v for k, v in objects.items() if k not in temps}, "store directory")
        assert not problems, storm.report(problems, mount, seed)
        with Mount(f"file://{file_store}", tmp_path / "fresh", tmp_path / "cache-fresh") as fresh:
            problems = storm.check_mount(fresh.path, exact=True)
            assert not problems, storm.report(problems, mount, seed)
            assert fresh.umount().returncode == 0
    finally:
        mount.cleanup()
    print(f"{rounds} rounds, {len(storm.model)} files at the end, {time.monotonic() - started:.1f} s")
