"""`shufflefs show FILE.index` on map outputs made here, right and damaged: what Spark wrote is
decoded and checked (tests/test_spark.py does it on a real job's files); damage is reported in
the output and the exit status, never as a traceback."""

from __future__ import annotations

import json
import os
import struct
import zlib

import pytest

from shufflefs.testing.mounting import run_cli

BLOCK_MANAGER = "blockmgr-10000000-0000-4000-8000-000000000000"


def map_output(
    root, partitions: list[bytes], *, index_sub="0c", data_sub="1f", checksum_sub="3a", algorithm="ADLER32"
) -> str:
    """shuffle_0_5_0 as Spark lays it out: each file in the subdirectory its name hashes to."""
    offsets = [0]
    for part in partitions:
        offsets.append(offsets[-1] + len(part))
    files = {
        (index_sub, "shuffle_0_5_0.index"): struct.pack(f">{len(offsets)}q", *offsets),
        (data_sub, "shuffle_0_5_0.data"): b"".join(partitions),
    }
    if algorithm is not None:
        function = {"ADLER32": zlib.adler32, "CRC32": zlib.crc32}[algorithm]
        files[(checksum_sub, f"shuffle_0_5_0.checksum.{algorithm}")] = struct.pack(
            f">{len(partitions)}q", *(function(part) for part in partitions)
        )
    for (sub, name), body in files.items():
        os.makedirs(os.path.join(root, BLOCK_MANAGER, sub), exist_ok=True)
        with open(os.path.join(root, BLOCK_MANAGER, sub, name), "wb") as f:
            f.write(body)
    return os.path.join(root, BLOCK_MANAGER, index_sub, "shuffle_0_5_0.index")


def show(index: str) -> tuple[int, dict]:
    result = run_cli("show", index, "--json")
    assert "Traceback" not in result.stderr and result.stderr == "", result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.mark.parametrize("algorithm", ["ADLER32", "CRC32", None])
def test_a_map_output_is_decoded_and_checked(tmp_path, algorithm):
    index = map_output(tmp_path, [b"a" * 10, b"", b"bc" * 7], algorithm=algorithm)
    status, report = show(index)
    assert status == 0 and report["problems"] == []
    assert [(p["offset"], p["length"]) for p in report["partitions"]] == [(0, 10), (10, 0), (10, 14)]
    assert report["data_bytes"] == 24 and report["data"].endswith("/1f/shuffle_0_5_0.data")
    assert [p["checksum_ok"] for p in report["partitions"]] == [True if algorithm else None] * 3
    table = run_cli("show", index)
    assert table.returncode == 0 and "3 partitions, 24 bytes" in table.stdout


def test_damage_is_reported(tmp_path):
    index = map_output(tmp_path / "flipped", [b"a" * 10, b"b" * 10])
    data = os.path.join(os.path.dirname(os.path.dirname(index)), "1f", "shuffle_0_5_0.data")
    with open(data, "r+b") as f:
        f.seek(15)
        f.write(b"X")
    status, report = show(index)
    assert status == 1 and [p["checksum_ok"] for p in report["partitions"]] == [True, False]
    assert report["problems"] == ["1 partitions do not match their ADLER32 checksums (first: 1)"]

    index = map_output(tmp_path / "short", [b"a" * 10, b"b" * 10])
    with open(os.path.join(os.path.dirname(os.path.dirname(index)), "1f", "shuffle_0_5_0.data"), "r+b") as f:
        f.truncate(12)
    status, report = show(index)
    assert status == 1 and report["problems"] == ["the data file is 12 bytes; the index says 20"]

    index = map_output(tmp_path / "torn", [b"a" * 10])
    with open(index, "r+b") as f:
        f.truncate(12)
    status, report = show(index)
    assert status == 1 and "not 8-byte offsets" in report["problems"][0]

    index = map_output(tmp_path / "no-data", [b"a"])
    os.unlink(os.path.join(os.path.dirname(os.path.dirname(index)), "1f", "shuffle_0_5_0.data"))
    status, report = show(index)
    assert status == 1 and report["problems"] == ["no data file shuffle_0_5_0.data beside it"]


@pytest.mark.parametrize(
    "name, needle", [("shuffle_0_5_0.data", "not a map output's index file"), ("shuffle_0_5_0.index", "cannot read")]
)
def test_what_is_not_an_index_file_is_refused_in_one_line(tmp_path, name, needle):
    path = tmp_path / name
    if name.endswith(".data"):
        path.write_bytes(b"x")
    result = run_cli("show", str(path))
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and needle in result.stderr, result.stderr
