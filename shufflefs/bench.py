"""`shufflefs bench`: Spark's shuffle I/O pattern on a directory, timed per phase.

The workload follows what Spark's sort shuffle does in its local dir (docs/SPARK_IO.md of the
team): each map task appends its partitions to `shuffle_0_M_0.data.<uuid>` in 32 KiB writes
with an fstat after each (O_APPEND), writes the `.index.<uuid>` offsets in one write, checks
that the final index does not exist, renames index then data into place, then writes and
renames the `.checksum.ADLER32` file. Files go into Spark's 64 hash buckets. Reducers open the
index, read two 8-byte offsets, open the data file and read their block in 32 KiB reads. Every
block read back is checked against the checksum computed when it was written, so a filesystem
that returns wrong bytes fails the benchmark instead of looking fast.

Phases: write (map outputs committed), index (index lookups alone), read (index lookup plus
block read, as a reducer), delete (Spark's cleanup: remove the tree). Everything happens inside
one new directory `DIR/shufflefs-bench-<id>/`, removed at the end even after a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from shufflefs.control import mount_stats
from shufflefs.options import CommandError, parse_size, positive_int
from shufflefs.places import shufflefs_mount_of

SPARK_WRITE_SIZE = 32 * 1024  # spark.shuffle.file.buffer: the size of Spark's writes
SPARK_READ_SIZE = 32 * 1024
SUBDIRS = 64  # spark.diskStore.subDirectories
PATTERN_BYTES = 8 * 1024 * 1024
#: the phase rate each ratio compares
RATE_OF_PHASE = {"write": "mb_per_s", "index": "files_per_s", "read": "mb_per_s", "delete": "files_per_s"}
STORE_COUNTERS = (
    "put_requests",
    "put_bytes",
    "get_range_requests",
    "get_range_bytes",
    "head_requests",
    "list_dir_requests",
    "delete_requests",
    "deleted_keys",
    "move_requests",
    "failed_requests",
)


class BenchError(CommandError):
    pass


@dataclass(frozen=True)
class Workload:
    mappers: int
    reducers: int
    block_size: int
    pool_size: int
    write_only: bool = False

    @property
    def data_bytes(self) -> int:
        return self.mappers * self.reducers * self.block_size


@dataclass
class Phase:
    name: str
    bytes: int
    seconds: float
    files: int
    opens: int
    #: write and delete on a shufflefs mount: seconds until the store had all of it
    stored_seconds: float | None = None
    #: CPU time the shufflefs daemon spent in the phase (until stored)
    daemon_cpu_seconds: float | None = None
    #: requests the daemon received from the kernel in the phase
    fuse_requests: int | None = None
    store: dict = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds

    @property
    def opens_per_s(self) -> float:
        return self.opens / self.seconds

    @property
    def rate(self) -> float:
        return getattr(self, RATE_OF_PHASE[self.name])

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "mb_per_s": self.mb_per_s,
            "files_per_s": self.files_per_s,
            "opens_per_s": self.opens_per_s,
        }


def java_string_hash(text: str) -> int:
    h = 0
    for char in text:
        h = (31 * h + ord(char)) & 0xFFFFFFFF
    return h - (1 << 32) if h & 0x80000000 else h


def bucket_of(name: str) -> str:
    """Spark's DiskBlockManager.getFile with one local dir: the hash subdirectory of `name`."""
    h = java_string_hash(name)
    h = 0 if h == -(1 << 31) else abs(h)  # Utils.nonNegativeHash
    return "%02x" % (h % SUBDIRS)


class Progress:
    """A one-line progress bar on stderr while a phase runs (only on a terminal)."""

    def __init__(self, label: str, total: int, unit_bytes: bool):
        self.label = label
        self.total = max(total, 1)
        self.unit_bytes = unit_bytes
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = None
        if sys.stderr.isatty():
            self._thread = threading.Thread(target=self._draw_until_stopped, daemon=True)
            self._thread.start()

    def add(self, amount: int) -> None:
        with self._lock:
            self.done += amount

    def _draw_until_stopped(self) -> None:
        while not self._stop.wait(0.2):
            fraction = min(self.done / self.total, 1.0)
            rate = self.done / max(time.monotonic() - self._started, 1e-9)
            speed = f"{rate / 1e6:8.1f} MB/s" if self.unit_bytes else f"{rate:8.0f} /s"
            bar = "#" * int(fraction * 30)
            sys.stderr.write(f"\r{self.label:<28} [{bar:<30}] {fraction:4.0%} {speed}")
            sys.stderr.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


class ShuffleRun:
    """One run of the workload in a fresh directory under `root`."""

    def __init__(self, root: str, workload: Workload, label: str, on_mount: bool = False):
        self.workload = workload
        self.label = label
        self.on_mount = on_mount  # a shufflefs mount: count its store requests per phase
        self.base = os.path.join(root, f"shufflefs-bench-{uuid.uuid4().hex[:8]}")
        self.blockmgr = os.path.join(self.base, f"blockmgr-{uuid.uuid4()}")
        self.checksums: dict[int, list[int]] = {}
        self._dirs_made: set[str] = set()
        self._dirs_lock = threading.Lock()
        self._pattern = os.urandom(PATTERN_BYTES)

    # -- layout
    def path(self, name: str) -> str:
        directory = os.path.join(self.blockmgr, bucket_of(name))
        if directory not in self._dirs_made:
            with self._dirs_lock:  # Spark creates a bucket on first use, as here
                os.makedirs(directory, exist_ok=True)
                self._dirs_made.add(directory)
        return os.path.join(directory, name)

    def _chunks(self, mapper: int, reducer: int):
        """The bytes of block (mapper, reducer) in Spark-sized pieces: a different stretch of
        one random pattern per block, so misplaced blocks are caught."""
        start = ((mapper * 7919 + reducer * 104729) * SPARK_WRITE_SIZE) % PATTERN_BYTES
        pattern = memoryview(self._pattern)
        left = self.workload.block_size
        while left:
            size = min(left, SPARK_WRITE_SIZE, PATTERN_BYTES - start)
            yield pattern[start : start + size]
            left -= size
            start = (start + size) % PATTERN_BYTES

    # -- the map side
    def write_map_output(self, mapper: int, progress: Progress) -> tuple[int, int]:
        reducers = self.workload.reducers
        stem = f"shuffle_0_{mapper}_0"
        data = self.path(stem + ".data")
        data_temp = f"{data}.{uuid.uuid4()}"
        sums = []
        fd = os.open(data_temp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            for reducer in range(reducers):
                checksum = 1
                for chunk in self._chunks(mapper, reducer):
                    os.write(fd, chunk)
                    os.fstat(fd)  # FileChannel.position() on an append channel
                    checksum = zlib.adler32(chunk, checksum)
                sums.append(checksum)
                progress.add(self.workload.block_size)
        finally:
            os.close(fd)
        offsets = [reducer * self.workload.block_size for reducer in range(reducers + 1)]
        index = self.path(stem + ".index")
        index_temp = f"{index}.{uuid.uuid4()}"
        _write_file(index_temp, struct.pack(f">{reducers + 1}q", *offsets))
        if os.path.exists(index):  # Spark's check for an earlier successful attempt
            raise BenchError(f"{index} exists before its map output was committed")
        os.rename(index_temp, index)
        os.rename(data_temp, data)
        checksum_file = self.path(stem + ".checksum.ADLER32")
        checksum_temp = f"{checksum_file}.{uuid.uuid4()}"
        _write_file(checksum_temp, struct.pack(f">{reducers}q", *sums))
        os.rename(checksum_temp, checksum_file)
        self.checksums[mapper] = sums
        return offsets[-1] + 8 * (reducers + 1) + 8 * reducers, 3

    # -- the reduce side
    def _block_range(self, mapper: int, reducer: int) -> tuple[int, int]:
        fd = os.open(self.path(f"shuffle_0_{mapper}_0.index"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, reducer * 8, os.SEEK_SET)
            raw = os.read(fd, 8) + os.read(fd, 8)
        finally:
            os.close(fd)
        if len(raw) != 16:
            raise BenchError(f"index of map output {mapper} is short: {len(raw)} bytes at {reducer * 8}")
        start, end = struct.unpack(">2q", raw)
        size = self.workload.block_size
        if (start, end) != (reducer * size, (reducer + 1) * size):
            raise BenchError(
                f"index of map output {mapper} gives block {reducer} as {start}..{end}, "
                f"written as {reducer * size}..{(reducer + 1) * size}"
            )
        return start, end

    def lookup_blocks(self, reducer: int, progress: Progress) -> tuple[int, int]:
        for mapper in range(self.workload.mappers):
            self._block_range(mapper, reducer)
            progress.add(1)
        return 16 * self.workload.mappers, self.workload.mappers

    def read_blocks(self, reducer: int, progress: Progress) -> tuple[int, int]:
        total = 0
        for mapper in range(self.workload.mappers):
            start, end = self._block_range(mapper, reducer)
            data = self.path(f"shuffle_0_{mapper}_0.data")
            fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.lseek(fd, start, os.SEEK_SET)
                checksum = 1
                left = end - start
                while left:
                    chunk = os.read(fd, min(left, SPARK_READ_SIZE))
                    if not chunk:
                        raise BenchError(f"{data} ends early: {end - left} of {end} bytes")
                    checksum = zlib.adler32(chunk, checksum)
                    left -= len(chunk)
            finally:
                os.close(fd)
            if checksum != self.checksums[mapper][reducer]:
                raise BenchError(f"block {reducer} of {data} reads back different bytes than were written")
            total += 16 + end - start
            progress.add(end - start)
        return total, 2 * self.workload.mappers

    # -- running phases
    def _in_parallel(self, name: str, task, items: int, progress_total: int, unit_bytes: bool):
        """An action running task(item) for every item on the pool, summing (bytes, opens)."""

        def action() -> tuple[int, int]:
            progress = Progress(f"{self.label}: {name}", progress_total, unit_bytes)
            try:
                with ThreadPoolExecutor(self.workload.pool_size) as pool:
                    results = list(pool.map(lambda item: task(item, progress), range(items)))
            finally:
                progress.close()
            return sum(r[0] for r in results), sum(r[1] for r in results)

        return action

    def _delete_tree(self) -> tuple[int, int]:
        shutil.rmtree(self.base)
        return 0, 0

    def _timed(self, name: str, files: int, action) -> Phase:
        """Run one phase; on a mount, count the store requests it caused, and for phases that
        change the store, wait until the store has all of it."""
        changes_store = name in ("write", "delete")
        before = self._store_counters() if self.on_mount else None
        started = time.perf_counter()
        try:
            nbytes, opens = action()
        except OSError as exc:
            raise BenchError(f"{name} phase on {self.label}: {exc}") from None
        result = Phase(name, nbytes, time.perf_counter() - started, files, opens)
        if before is not None:
            after = self._store_counters(sync=changes_store)
            if changes_store:
                result.stored_seconds = time.perf_counter() - started
            result.store = {k: after[k] - before[k] for k in STORE_COUNTERS if after[k] != before[k]}
            result.daemon_cpu_seconds = round(after["cpu_seconds"] - before["cpu_seconds"], 2)
            result.fuse_requests = after["fuse_requests"] - before["fuse_requests"]
        return result

    def _store_counters(self, sync: bool = False) -> dict:
        stats = mount_stats(self.base, sync=sync)
        return {
            **{k: stats["store"].get(k, 0) for k in STORE_COUNTERS},
            "cpu_seconds": stats["cpu_seconds"],
            "fuse_requests": sum(stats["fuse"]["requests"].values()),
        }

    def run(self) -> dict[str, Phase]:
        w = self.workload
        os.makedirs(self.blockmgr)
        phases = {}
        try:
            phases["write"] = self._timed(
                "write", w.mappers, self._in_parallel("write", self.write_map_output, w.mappers, w.data_bytes, True)
            )
            if not w.write_only:
                lookups = w.mappers * w.reducers
                phases["index"] = self._timed(
                    "index", lookups, self._in_parallel("index", self.lookup_blocks, w.reducers, lookups, False)
                )
                phases["read"] = self._timed(
                    "read", lookups, self._in_parallel("read", self.read_blocks, w.reducers, w.data_bytes, True)
                )
            phases["delete"] = self._timed("delete", 3 * w.mappers, self._delete_tree)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
        return phases


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- command line
def add_command(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time Spark's shuffle I/O pattern on a directory",
        description="Write map outputs the way Spark does (temp file, appends, index and checksum "
        "files, renames), then read them back the way reducers do, and report each "
        "phase's throughput. On a shufflefs mount it also reports the requests and bytes "
        "sent to the store. Works in a new subdirectory of DIR and removes it.",
        epilog="Example: shufflefs bench /mnt/shuffle --compare /var/tmp --rounds 3",
    )
    bench.add_argument("dir", metavar="DIR", help="directory to test (a shufflefs mount or any other)")
    bench.add_argument("--mappers", type=positive_int, default=200, help="map outputs (default: %(default)s)")
    bench.add_argument(
        "--reducers", type=positive_int, default=100, help="partitions per map output (default: %(default)s)"
    )
    bench.add_argument(
        "--block-size",
        type=parse_size,
        default=32 * 1024,
        help="bytes per partition block, e.g. 1K, 256K (default: 32K)",
    )
    bench.add_argument(
        "--pool-size", type=positive_int, default=4, help="map (then reduce) tasks at once (default: %(default)s)"
    )
    bench.add_argument("--write-only", action="store_true", help="skip the index and read phases")
    bench.add_argument(
        "--compare", metavar="PLAIN_DIR", help="also run on this plain directory, alternating, and report ratios"
    )
    bench.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="runs per directory, alternating with --compare; medians reported (default: %(default)s)",
    )
    bench.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    bench.set_defaults(run=cmd_bench)


def _check_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise BenchError(f"{what} {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise BenchError(f"{what} {path} is not writable")
    return os.path.realpath(path)


def cmd_bench(args) -> int:
    workload = Workload(args.mappers, args.reducers, args.block_size, args.pool_size, args.write_only)
    targets = {"dir": _check_dir(args.dir, "DIR")}
    if args.compare:
        targets["plain"] = _check_dir(args.compare, "--compare")
        if targets["plain"] == targets["dir"]:
            raise BenchError("--compare must be another directory than DIR")
        if shufflefs_mount_of(targets["plain"]):
            raise BenchError(f"--compare {args.compare} is on a shufflefs mount; give a plain directory")
    is_mount = {name: shufflefs_mount_of(path) is not None for name, path in targets.items()}
    if is_mount["dir"]:
        mount_stats(targets["dir"])  # fail now, not after the write phase, if the daemon does not answer
    runs: dict[str, list[dict[str, Phase]]] = {name: [] for name in targets}
    for round_number in range(1, args.rounds + 1):
        for name, path in targets.items():  # alternating: dir, plain, dir, plain ...
            label = f"{name} {round_number}/{args.rounds}"
            runs[name].append(ShuffleRun(path, workload, label, is_mount[name]).run())
    report = build_report(workload, targets, is_mount, runs)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
    return 0


def _median_phase(phases: list[Phase]) -> dict:
    middle = sorted(phases, key=lambda p: p.seconds)[len(phases) // 2]
    return {**middle.as_dict(), "seconds_runs": [p.seconds for p in phases]}


def build_report(workload: Workload, targets: dict, is_mount: dict, runs: dict) -> dict:
    report = {"workload": {**asdict(workload), "data_bytes": workload.data_bytes}, "targets": {}}
    for name, path in targets.items():
        phase_names = runs[name][0].keys()
        report["targets"][name] = {
            "path": path,
            "shufflefs": is_mount[name],
            "phases": {p: _median_phase([run[p] for run in runs[name]]) for p in phase_names},
        }
    if "plain" in targets:
        report["ratios"] = {}
        for phase, median in report["targets"]["dir"]["phases"].items():
            rate = RATE_OF_PHASE[phase]
            plain = report["targets"]["plain"]["phases"][phase][rate]
            report["ratios"][phase] = median[rate] / plain if plain else None
    return report


def format_report(report: dict) -> str:
    w = report["workload"]
    lines = [
        f"workload: {w['mappers']} map outputs x {w['reducers']} partitions x {w['block_size']} B "
        f"= {w['data_bytes'] / 1e6:.1f} MB, {w['pool_size']} tasks at once",
        "",
        f"{'phase':7} {'target':6} {'seconds':>8} {'MB/s':>8} {'files/s':>9} {'opens/s':>9} "
        f"{'ratio':>6}  {'until stored':>12}  {'daemon CPU':>10}  {'FUSE reqs':>9}  store",
    ]
    ratios = report.get("ratios", {})
    for phase in report["targets"]["dir"]["phases"]:
        for name, target in report["targets"].items():
            p = target["phases"][phase]
            ratio = f"{ratios[phase]:.2f}" if name == "dir" and ratios.get(phase) else ""
            stored = f"{p['stored_seconds']:.2f}s" if p["stored_seconds"] is not None else ""
            cpu = f"{p['daemon_cpu_seconds']:.2f}s" if p["daemon_cpu_seconds"] is not None else ""
            requests = p["fuse_requests"] if p["fuse_requests"] is not None else ""
            store = " ".join(f"{k}={v}" for k, v in p["store"].items())
            lines.append(
                f"{phase:7} {name:6} {p['seconds']:8.2f} {p['mb_per_s']:8.1f} {p['files_per_s']:9.0f} "
                f"{p['opens_per_s']:9.0f} {ratio:>6}  {stored:>12}  {cpu:>10}  {requests:>9}  {store}"
            )
    lines.append("")
    lines.append(
        "files/s: map outputs (write), block lookups (index, read), files removed (delete). "
        "ratio: DIR / plain of MB/s (write, read) or files/s (index, delete), medians."
    )
    for name, target in report["targets"].items():
        lines.append(f"{name}: {target['path']}" + (" (shufflefs)" if target["shufflefs"] else ""))
    return "\n".join(lines)
