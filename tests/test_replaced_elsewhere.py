"""A committed file replaced by another mount (issue 10, finding 4): the mounts that had read it
take the new version within `remote_ttl`, and never return bytes of two versions."""

from __future__ import annotations

import errno
import os
import time

import pytest
import trio

from shufflefs.core import READAHEAD, FsError
from shufflefs.testing.corefs import MiB, commit, errno_of, key, mkdirs, resolve, write_file
from shufflefs.testing.mounting import Mount
from shufflefs.testing.stores import contents

DIR = "spark-1/blockmgr-10000000-0000-4000-8000-000000000000/0c"
NAME = "shuffle_0_5_0.data"


async def test_a_reader_sees_the_new_version_and_never_a_mix(env):
    store = env.store()
    writer = env.mount(store, name="node-a")
    reader = env.mount(store, name="node-b", remote_ttl=0.05)
    d = await mkdirs(writer.fs, DIR)
    old, new = os.urandom(READAHEAD + MiB), os.urandom(READAHEAD + 3 * MiB)
    await commit(writer.fs, d, NAME, old)

    node = await resolve(reader.fs, f"{DIR}/{NAME}")
    assert node.size == len(old)
    fh = await reader.fs.open(node.ino, os.O_RDONLY)
    assert await reader.fs.read(fh, 0, 4096) == old[:4096]

    await write_file(writer.fs, d, NAME + ".tmp", new)
    await writer.fs.rename(d, NAME + ".tmp", d, NAME)  # replaces the object
    assert contents(store)[key(NAME, DIR)] == new

    # the open handle gets nothing of the new version
    with pytest.raises(FsError) as exc:
        await reader.fs.read(fh, READAHEAD, 4096)
    assert errno_of(exc) == errno.ESTALE

    await trio.sleep(0.1)
    again = await resolve(reader.fs, f"{DIR}/{NAME}")  # the kernel looks it up again after remote_ttl
    assert again.size == len(new) and again.ino != node.ino  # nothing the kernel cached is taken for it
    with pytest.raises(FsError) as exc:
        await reader.fs.read(fh, 4096, 4096)
    assert errno_of(exc) == errno.ESTALE
    await reader.fs.release(fh)
    fh = await reader.fs.open(again.ino, os.O_RDONLY)
    assert await reader.fs.read(fh, READAHEAD + 2 * MiB, 4096) == new[READAHEAD + 2 * MiB :][:4096]
    assert await reader.fs.read(fh, 0, 4096) == new[:4096]
    await reader.fs.release(fh)
    assert reader.fs.stats["remote_replacements"] == 1


async def test_a_replaced_index_is_not_served_from_the_index_cache(env):
    store = env.store()
    writer = env.mount(store, name="node-a")
    reader = env.mount(store, name="node-b", remote_ttl=0.05)
    d = await mkdirs(writer.fs, DIR)
    index = "shuffle_0_5_0.index"
    await commit(writer.fs, d, index, bytes(8) * 4)
    node = await resolve(reader.fs, f"{DIR}/{index}")
    fh = await reader.fs.open(node.ino, os.O_RDONLY)
    assert await reader.fs.read(fh, 0, 100) == bytes(8) * 4  # now in the reader's index cache
    await reader.fs.release(fh)
    await write_file(writer.fs, d, index + ".tmp", b"\1" * 8 * 4)
    await writer.fs.rename(d, index + ".tmp", d, index)
    await trio.sleep(0.1)
    node = await resolve(reader.fs, f"{DIR}/{index}")
    fh = await reader.fs.open(node.ino, os.O_RDONLY)
    assert await reader.fs.read(fh, 0, 100) == b"\1" * 8 * 4
    await reader.fs.release(fh)


def test_another_mount_sees_a_replaced_file(tmp_path, file_store):
    """Through the kernel: sizes, bytes and page cache of the reader follow the writer."""
    url = f"file://{file_store}"
    with Mount(url, tmp_path / "a", tmp_path / "cache-a") as a, Mount(url, tmp_path / "b", tmp_path / "cache-b") as b:
        os.makedirs(f"{a.path}/{DIR}")
        old, new = os.urandom(300_000), os.urandom(700_000)
        with open(f"{a.path}/{DIR}/{NAME}.tmp", "wb") as f:
            f.write(old)
        os.rename(f"{a.path}/{DIR}/{NAME}.tmp", f"{a.path}/{DIR}/{NAME}")
        with open(f"{b.path}/{DIR}/{NAME}", "rb") as f:
            assert f.read() == old
        with open(f"{a.path}/{DIR}/{NAME}.tmp", "wb") as f:
            f.write(new)
        os.rename(f"{a.path}/{DIR}/{NAME}.tmp", f"{a.path}/{DIR}/{NAME}")
        time.sleep(1.5)  # remote_ttl: how long another mount may show the old version
        assert os.stat(f"{b.path}/{DIR}/{NAME}").st_size == len(new)
        with open(f"{b.path}/{DIR}/{NAME}", "rb") as f:
            assert f.read() == new
