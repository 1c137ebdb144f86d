"""`shufflefs show FILE.index`: one map output as Spark's reducers see it. Its index file holds
R+1 big-endian 8-byte offsets into its data file, one range per reduce partition; its checksum
file (`.checksum.<ALGORITHM>`, when Spark wrote one) R big-endian 8-byte checksums of those
ranges. Spark puts each file of a block manager in the subdirectory its name hashes to, so the
data and checksum files are looked for in every subdirectory of the index file's block manager.
Standard library only; works on a mount or on any copy of a block manager directory."""

from __future__ import annotations

import glob
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field

from shufflefs.options import CommandError

INDEX_NAME = re.compile(r"shuffle_(\d+)_(\d+)_(\d+)\.index")
#: Spark's checksum algorithms that the standard library computes (CRC32C is not among them)
CHECKSUMS = {"ADLER32": (zlib.adler32, 1), "CRC32": (zlib.crc32, 0)}
READ_CHUNK = 1 << 20


class ShowError(Exception):
    """The file cannot be shown at all (not an index file's name, unreadable)."""


@dataclass
class Partition:
    offset: int
    length: int
    checksum_ok: bool | None = None  # None: not checked


@dataclass
class MapOutput:
    index: str
    shuffle: int
    map: int
    reduce: int
    partitions: list[Partition] = field(default_factory=list)
    data: str | None = None
    data_size: int | None = None
    checksum: str | None = None
    algorithm: str | None = None
    problems: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {
            "index": self.index,
            "shuffle": self.shuffle,
            "map": self.map,
            "reduce": self.reduce,
            "data": self.data,
            "data_bytes": self.data_size,
            "checksum": self.checksum,
            "algorithm": self.algorithm,
            "problems": self.problems,
            "partitions": [
                {"partition": n, "offset": p.offset, "length": p.length, "checksum_ok": p.checksum_ok}
                for n, p in enumerate(self.partitions)
            ],
        }


def companions(index: str, pattern: str) -> list[str]:
    """Files named `pattern` (a glob) in the index file's directory, then in the other
    subdirectories of its block manager."""
    directory = os.path.dirname(os.path.abspath(index))
    found = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
    for path in sorted(glob.glob(os.path.join(glob.escape(os.path.dirname(directory)), "*", pattern))):
        if path not in found:
            found.append(path)
    return found


def inspect(index: str) -> MapOutput:
    match = INDEX_NAME.fullmatch(os.path.basename(index))
    if match is None:
        raise ShowError(f"{index} is not a map output's index file (shuffle_S_M_R.index)")
    shuffle, map_id, reduce = (int(group) for group in match.groups())
    output = MapOutput(index, shuffle, map_id, reduce)
    try:
        with open(index, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ShowError(f"cannot read {index}: {exc.strerror}") from None
    if len(raw) < 16 or len(raw) % 8:
        output.problems.append(f"the index file is {len(raw)} bytes: not 8-byte offsets of at least one partition")
        return output
    offsets = struct.unpack(f">{len(raw) // 8}q", raw)
    if offsets[0] != 0:
        output.problems.append(f"the first offset is {offsets[0]}, not 0")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        output.problems.append("the offsets decrease: this is not an index Spark wrote")
        return output
    output.partitions = [Partition(a, b - a) for a, b in zip(offsets, offsets[1:])]
    stem = f"shuffle_{output.shuffle}_{output.map}_{output.reduce}"
    data = companions(index, f"{stem}.data")
    if not data:
        output.problems.append(f"no data file {stem}.data beside it")
        return output
    output.data = data[0]
    try:
        output.data_size = os.path.getsize(output.data)
    except OSError as exc:
        output.problems.append(f"cannot read {output.data}: {exc.strerror}")
        return output
    if output.data_size != offsets[-1]:
        output.problems.append(f"the data file is {output.data_size} bytes; the index says {offsets[-1]}")
        return output
    checksums = companions(index, f"{glob.escape(stem)}.checksum.*")
    if checksums:
        _check(output, checksums[0])
    return output


def _check(output: MapOutput, path: str) -> None:
    output.checksum = path
    output.algorithm = path.rsplit(".", 1)[1]
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        output.problems.append(f"cannot read {path}: {exc.strerror}")
        return
    if len(raw) != 8 * len(output.partitions):
        output.problems.append(
            f"the checksum file is {len(raw)} bytes, not 8 for each of {len(output.partitions)} partitions"
        )
        return
    if output.data is None or output.algorithm not in CHECKSUMS:
        return  # not computable here: reported as not checked
    function, start = CHECKSUMS[output.algorithm]
    expected = struct.unpack(f">{len(output.partitions)}q", raw)
    try:
        with open(output.data, "rb") as f:
            for partition, want in zip(output.partitions, expected):
                f.seek(partition.offset)
                value, left = start, partition.length
                while left:
                    chunk = f.read(min(left, READ_CHUNK))
                    if not chunk:
                        break
                    value = function(chunk, value)
                    left -= len(chunk)
                partition.checksum_ok = value == want & 0xFFFFFFFF
    except OSError as exc:
        output.problems.append(f"cannot read {output.data}: {exc.strerror}")
        return
    bad = [n for n, p in enumerate(output.partitions) if p.checksum_ok is False]
    if bad:
        output.problems.append(
            f"{len(bad)} partitions do not match their {output.algorithm} checksums (first: {bad[0]})"
        )


def render(output: MapOutput) -> str:
    total = sum(p.length for p in output.partitions)
    lines = [
        f"shuffle {output.shuffle}, map {output.map}, reduce {output.reduce}: "
        f"{len(output.partitions)} partitions, {total} bytes ({output.index})"
    ]
    if output.data is not None:
        lines.append(f"data:      {output.data}, {output.data_size} bytes")
    if output.checksum is not None:
        checked = [p for p in output.partitions if p.checksum_ok is not None]
        verdict = (
            f"{sum(bool(p.checksum_ok) for p in checked)} of {len(output.partitions)} partitions match"
            if checked
            else "not checked here"
        )
        lines.append(f"checksums: {output.checksum} ({output.algorithm}): {verdict}")
    for problem in output.problems:
        lines.append(f"problem:   {problem}")
    if output.partitions:
        lines.append(f"{'partition':>9} {'offset':>12} {'length':>12}  checksum")
        for n, p in enumerate(output.partitions):
            mark = {True: "ok", False: "MISMATCH", None: "-"}[p.checksum_ok]
            lines.append(f"{n:>9} {p.offset:>12} {p.length:>12}  {mark}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command
def add_command(commands) -> None:
    parser = commands.add_parser(
        "show",
        help="decode a map output's index file, and check it against its data and checksum files",
        description="Print the partitions (offset, length) of a map output from its index file "
        "(shuffle_S_M_R.index, on a mount or anywhere), check that its data file holds as "
        "many bytes as the index says, and each partition against Spark's checksum file when "
        "there is one (ADLER32, CRC32; reads the whole data file). Exit status 1 when "
        "something does not match.",
    )
    parser.add_argument("index", metavar="FILE.index")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        output = inspect(args.index)
    except ShowError as exc:
        raise CommandError(str(exc)) from None
    print(json.dumps(output.report(), indent=1) if args.json else render(output))
    return 1 if output.problems else 0
