"""`shufflefs ls` on directories and stores made here (tests/test_spark.py lists a real job's
files on a mount and in S3): grouping by block manager and shuffle, what waits for the store,
the registry's applications, the listing limit, bad input."""

from __future__ import annotations

import json
import os

import pytest

from shufflefs.inventory import Budget, Truncated, shuffles, walk_directory, walk_store
from shufflefs.stores.memory import MemoryStore
from shufflefs.testing.mounting import run_cli

BM = "blockmgr-10000000-0000-4000-8000-000000000000"
OTHER = "blockmgr-20000000-0000-4000-8000-000000000000"
FILES = {
    f"spark-1/executor-1/{BM}/0c/shuffle_0_1_0.index": b"i" * 16,
    f"spark-1/executor-1/{BM}/1f/shuffle_0_1_0.data": b"d" * 100,
    f"spark-1/executor-1/{BM}/3a/shuffle_0_1_0.checksum.ADLER32": b"c" * 8,
    f"spark-1/executor-1/{BM}/0d/shuffle_1_7_0.index": b"i" * 24,
    f"spark-1/executor-1/{BM}/0d/shuffle_1_7_0.data": b"d" * 5,
    f"spark-1/executor-1/{BM}/11/temp_shuffle_1234": b"scratch",
    f"spark-1/executor-2/{OTHER}/02/shuffle_0_2_0.index": b"i" * 16,
    "spark-1/userFiles-1/job.py": b"not a shuffle",
}


def lay_out(root) -> None:
    for key, body in FILES.items():
        os.makedirs(os.path.join(root, os.path.dirname(key)), exist_ok=True)
        with open(os.path.join(root, key), "wb") as f:
            f.write(body)


def summary(found) -> dict:
    return {(s.where, s.shuffle): (s.map_outputs, s.files, s.bytes, s.pending) for s in found}


def test_a_directory_is_listed_by_block_manager_and_shuffle(tmp_path):
    lay_out(tmp_path)
    pending = {f"spark-1/executor-1/{BM}/1f/shuffle_0_1_0.data"}
    found, truncated = shuffles(walk_directory(str(tmp_path)), pending)
    assert not truncated
    assert summary(found) == {
        (f"spark-1/executor-1/{BM}", 0): (1, 3, 124, 1),
        (f"spark-1/executor-1/{BM}", 1): (1, 2, 29, 0),
        (f"spark-1/executor-2/{OTHER}", 0): (1, 1, 16, 0),
    }
    result = run_cli("ls", str(tmp_path))
    assert result.returncode == 0 and "3 shuffles in 2 block manager directories, 3 map outputs" in result.stdout


def test_a_store_is_listed_with_the_applications_the_registry_knows_and_within_the_limit(tmp_path):
    store = MemoryStore()
    lay_out(tmp_path)
    for key in FILES:
        store.put_file(key, os.path.join(tmp_path, key))
    registry_record = tmp_path / "record"
    registry_record.write_text("{}")
    store.put_file(f".shufflefs/dirs/app-1/{BM}", str(registry_record))
    found, truncated = shuffles(walk_store(store, Budget(1000)))
    assert not truncated and summary(found) == {
        (f"spark-1/executor-1/{BM}", 0): (1, 3, 124, None),
        (f"spark-1/executor-1/{BM}", 1): (1, 2, 29, None),
        (f"spark-1/executor-2/{OTHER}", 0): (1, 1, 16, None),
    }
    found, truncated = shuffles(walk_store(store, Budget(6)))
    assert truncated and len(found) < 3
    with pytest.raises(Truncated):
        Budget(1).spend(2)


def test_ls_of_a_file_store_url_names_the_registered_application(tmp_path):
    store_root = tmp_path / "store"
    lay_out(store_root)
    os.makedirs(store_root / ".shufflefs" / "dirs" / "app-1")
    (store_root / ".shufflefs" / "dirs" / "app-1" / BM).write_text("{}")
    result = run_cli("ls", f"file://{store_root}", "--json")
    assert result.returncode == 0, result.stderr
    apps = {s["block_manager"].rsplit("/", 1)[1]: s["app"] for s in json.loads(result.stdout)["shuffles"]}
    assert apps == {BM: "app-1", OTHER: None}


@pytest.mark.parametrize(
    "target, needle",
    [
        ("/no/such/dir", "does not exist"),
        ("ftp://x/y", "unsupported store URL"),
        ("s3://user:secret@bucket/x", "credentials"),
    ],
)
def test_bad_targets_are_refused_in_one_line(target, needle):
    result = run_cli("ls", target)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and needle in result.stderr, result.stderr
    assert "secret" not in result.stderr
