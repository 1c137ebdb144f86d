"""A store in a DAOS container through pydaos: `daos://pool/container[/prefix]`.

The container must be of type PYTHON (pydaos refuses others). The layout, described in
docs/DAOS.md, uses only pydaos's dictionaries (DDict), found by name in the container:

- `shufflefs.layout`: layout version, shard count and chunk size, written by the first mount.
- `shufflefs.names.NNNN` (SHARDS of them): the namespace. A file is a key, its full path,
  whose value is its manifest (JSON: size, mtime, data id, chunk size). A directory `d/sub` is
  a marker key `d/sub/` in the shard of `d`. A directory's entries live in the shard chosen by
  the CRC32 of its path, so listing it reads one shard.
- `shufflefs.chunks`: file data, in chunks of at most `chunk_size` (1 MiB: what DDict reads in
  one round trip) under `<data id>.<index>`. A put writes new chunks under a fresh data id,
  then the manifest (the commit point: readers see the old file or the new one), then the
  directory markers, then removes the replaced chunks. A move rewrites only the manifest.

Directories exist while they hold something: a delete that empties one removes its marker,
then looks again and puts the marker back if a put raced in (puts write markers after their
manifest, bottom-up), so no file ends up under an unlisted directory.

pydaos raises PyDError whose text ends in the DER_* name; `DER_ERRORS` maps each name to
retry-or-not and an errno, in one table.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import threading
import time
import urllib.parse
import uuid
import zlib

import pydaos

from shufflefs.stores.base import (
    Listing,
    ObjectInfo,
    ObjectMissing,
    PreconditionFailed,
    Store,
    StoreError,
    UploadAborted,
    is_utf8,
    join_key,
)

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
DEFAULT_SHARDS = 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024  # DDict.value_size: a bigger value costs a second round trip
#: chunks per bput/bget: pydaos keeps up to 16 operations in flight per call
BATCH = 16
#: chunk keys per bput when removing data
REMOVE_BATCH = 256
#: read buffer for manifests (DDict would allocate its 1 MiB default per key)
MANIFEST_BUFFER = 4096

LAYOUT_DICT = "shufflefs.layout"
CHUNKS_DICT = "shufflefs.chunks"
DIR_MARKER = b"dir"

# DER_* name -> (worth retrying, errno reported to a waiting writer), for every code a pydaos
# call can plausibly return; unknown codes are retried and reported as EIO
DER_ERRORS: dict[str, tuple[bool, int]] = {
    # the agent, network or servers are busy, restarting or briefly unreachable
    "DER_TIMEDOUT": (True, errno.ETIMEDOUT),
    "DER_UNREACH": (True, errno.EHOSTUNREACH),
    "DER_BUSY": (True, errno.EBUSY),
    "DER_AGAIN": (True, errno.EAGAIN),
    "DER_HG": (True, errno.EIO),
    "DER_CANCELED": (True, errno.EIO),
    "DER_OOG": (True, errno.EIO),
    "DER_GRPVER": (True, errno.EIO),
    "DER_EXCLUDED": (True, errno.EIO),
    "DER_BAD_TARGET": (True, errno.EIO),
    "DER_NOREPLY": (True, errno.EIO),
    "DER_STALE": (True, errno.EIO),
    "DER_NOTLEADER": (True, errno.EIO),
    "DER_NOTREPLICA": (True, errno.EIO),
    "DER_INPROGRESS": (True, errno.EIO),
    "DER_SHUTDOWN": (True, errno.EIO),
    "DER_NO_SERVICE": (True, errno.EIO),
    "DER_EQ_BUSY": (True, errno.EIO),
    "DER_TX_RESTART": (True, errno.EIO),
    "DER_TX_BUSY": (True, errno.EIO),
    "DER_TX_UNCERTAIN": (True, errno.EIO),
    "DER_UPDATE_AGAIN": (True, errno.EIO),
    "DER_FETCH_AGAIN": (True, errno.EIO),
    "DER_TGT_RETRY": (True, errno.EIO),
    "DER_CHKPT_BUSY": (True, errno.EIO),
    "DER_AGENT_COMM": (True, errno.EIO),
    "DER_IO": (True, errno.EIO),
    "DER_NVME_IO": (True, errno.EIO),
    "DER_CSUM": (True, errno.EIO),  # another replica may serve the read
    "DER_NO_HDL": (True, errno.EIO),  # the handles are dropped and reopened: see REOPEN_ON
    "DER_NOMEM": (True, errno.ENOMEM),
    # nothing changes by retrying soon; the journal still retries writes, slowly
    "DER_NOSPACE": (True, errno.ENOSPC),  # space may come back: a write waits for it
    "DER_NO_PERM": (False, errno.EACCES),
    "DER_NONEXIST": (False, errno.ENOENT),
    "DER_INVAL": (False, errno.EINVAL),
    "DER_NOSYS": (False, errno.ENOSYS),
    "DER_NOTSUPPORTED": (False, errno.ENOTSUP),
    "DER_KEY2BIG": (False, errno.ENAMETOOLONG),
    "DER_REC2BIG": (False, errno.EFBIG),
    "DER_OVERFLOW": (False, errno.EOVERFLOW),
    "DER_RF": (False, errno.EIO),
    "DER_DATA_LOSS": (False, errno.EIO),
    "DER_AGENT_INCOMPAT": (False, errno.EIO),
    "DER_CONTROL_INCOMPAT": (False, errno.EIO),
    "DER_PROTO": (False, errno.EIO),
    "DER_NO_CERT": (False, errno.EACCES),
    "DER_BAD_CERT": (False, errno.EACCES),
}
UNKNOWN_DER = (True, errno.EIO)
#: errors after which the pool/container/object handles are reopened on the next call
REOPEN_ON = frozenset({"DER_NO_HDL"})

_LABEL = re.compile(r"[A-Za-z0-9_.:-]{1,127}")
_DER_NAME = re.compile(r"\b(DER_[A-Z0-9_]+)\b")


def der_name(exc: BaseException) -> str:
    """The DER_* name in a PyDError: pydaos keeps only its text, '<what>: DER_NAME'."""
    match = _DER_NAME.search(str(exc))
    return match.group(1) if match else "DER_UNKNOWN"


def daos_error(exc: BaseException, what: str) -> StoreError:
    """The StoreError for a PyDError, through the DER_ERRORS table."""
    name = der_name(exc)
    transient, code = DER_ERRORS.get(name, UNKNOWN_DER)
    return StoreError(f"{what}: {exc}", transient=transient, errno=code)


class _Manifest:
    __slots__ = ("size", "mtime_ns", "data", "chunk_size")

    def __init__(self, size: int, mtime_ns: int, data: str, chunk_size: int):
        self.size, self.mtime_ns, self.data, self.chunk_size = size, mtime_ns, data, chunk_size

    def encode(self) -> bytes:
        return json.dumps(
            {
                "v": LAYOUT_VERSION,
                "size": self.size,
                "mtime_ns": self.mtime_ns,
                "data": self.data,
                "chunk": self.chunk_size,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> _Manifest:
        try:
            fields = json.loads(raw)
            return cls(int(fields["size"]), int(fields["mtime_ns"]), str(fields["data"]), int(fields["chunk"]))
        except (ValueError, KeyError, TypeError):
            raise StoreError(
                f"{where} is not a shufflefs manifest (another program wrote this container?)", transient=False
            ) from None

    def chunk_keys(self, first: int = 0, last: int | None = None) -> list[str]:
        if last is None:
            last = (self.size - 1) // self.chunk_size
        return [f"{self.data}.{index}" for index in range(first, last + 1)] if self.size else []


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class DAOSStore(Store):
    def __init__(self, pool: str, container: str, prefix: str = ""):
        self.pool = pool
        self.container = container
        self.prefix = prefix.strip("/")
        self.url = f"daos://{pool}/{container}" + (f"/{self.prefix}" if self.prefix else "")
        self._lock = threading.Lock()
        self._cont = None
        self._dicts: dict[str, object] = {}
        self.shards = DEFAULT_SHARDS
        self.chunk_size = DEFAULT_CHUNK_SIZE

    @classmethod
    def from_url(cls, parsed: urllib.parse.SplitResult, **_options) -> DAOSStore:
        usage = "daos://<pool>/<container>[/prefix]"
        pool = parsed.netloc
        container, _, prefix = urllib.parse.unquote(parsed.path).lstrip("/").partition("/")
        if "@" in pool:
            raise StoreError(f"daos:// store URL must not contain credentials; use {usage}", transient=False)
        if not pool or not container:
            raise StoreError(f"daos:// store URL needs a pool and a container: {usage}", transient=False)
        if not hasattr(pydaos, "DCont"):
            raise StoreError(
                f"the pydaos found at {pydaos.__file__} has no DCont/DDict API: it needs the "
                "pydaos of DAOS 2.0 or later",
                transient=False,
            )
        for what, name in (("pool", pool), ("container", container)):
            if not _LABEL.fullmatch(name):
                raise StoreError(
                    f"invalid DAOS {what} label {name!r}: use a UUID or 1-127 letters, digits and '_.:-'",
                    transient=False,
                )
        return cls(pool, container, prefix)

    # -- connection ----------------------------------------------------------------------------

    def _open(self):
        with self._lock:
            if self._cont is None:
                try:
                    self._cont = pydaos.DCont(self.pool, self.container)
                except pydaos.PyDError as exc:
                    raise self._open_error(exc) from None
            return self._cont

    def _open_error(self, exc: BaseException) -> StoreError:
        name = der_name(exc)
        where = f"DAOS container {self.container!r} in pool {self.pool!r}"
        if "initialize" in str(exc).lower():
            pydaos.DaosClient.cleanup()  # else pydaos keeps the failed client and never retries daos_init
            return StoreError(
                f"cannot initialize the DAOS client ({name}): is daos_agent running on this "
                "node, and its socket (default /var/run/daos_agent) visible here?",
                transient=name in ("DER_AGENT_COMM", "DER_TIMEDOUT", "DER_UNREACH"),
            )
        if name == "DER_NONEXIST":
            return StoreError(
                f"{where} does not exist (list them with `daos container list {self.pool}`)",
                transient=False,
                errno=errno.ENOENT,
            )
        if name == "DER_NO_PERM":
            return StoreError(
                f"access denied to {where}: check its ACL (`daos container get-acl`)",
                transient=False,
                errno=errno.EACCES,
            )
        if name == "DER_INVAL":
            return StoreError(
                f"cannot open {where} ({name}): it must be a PYTHON container; create one with "
                f"`daos container create {self.pool} <label> --type PYTHON`",
                transient=False,
                errno=errno.EINVAL,
            )
        return daos_error(exc, f"cannot open {where}")

    def _dict(self, name: str):
        """The container's dictionary `name`, created on first use (by whichever mount is first)."""
        found = self._dicts.get(name)
        if found is not None:
            return found
        cont = self._open()
        try:
            try:
                found = cont.get(name)
            except pydaos.DObjNotFound:
                try:
                    found = cont.dict(name)
                except pydaos.PyDError as exc:
                    if der_name(exc) != "DER_EXIST":
                        raise
                    found = cont.get(name)  # another mount created it meanwhile
        except pydaos.PyDError as exc:
            raise self._error(exc, f"opening dictionary {name} of {self.url}") from None
        except pydaos.DObjNotFound:
            raise StoreError(f"dictionary {name} of {self.url} vanished while opening it") from None
        with self._lock:
            return self._dicts.setdefault(name, found)

    def _names(self, directory: str):
        """The namespace shard holding the entries of `directory` (a full path)."""
        return self._dict(f"shufflefs.names.{zlib.crc32(directory.encode()) % self.shards:04d}")

    def name_error(self, name):
        # see _full: a key that is not UTF-8 would make its whole shard unlistable
        return None if is_utf8(name) else errno.EINVAL

    def close(self) -> None:
        with self._lock:
            self._dicts.clear()
            self._cont = None

    # -- helpers -------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        full = join_key(self.prefix, key)
        try:
            full.encode()
        except UnicodeEncodeError:  # pydaos lists keys as str: one such key would break a whole shard
            raise StoreError(
                f"{key.encode(errors='surrogateescape')!r}: DAOS keys must be UTF-8",
                transient=False,
                errno=errno.EILSEQ,
            ) from None
        return full

    def _where(self, full: str) -> str:
        return f"daos://{self.pool}/{self.container}/{full}"

    def _error(self, exc: BaseException, what: str) -> StoreError:
        if der_name(exc) in REOPEN_ON:
            log.warning("%s: %s; reopening the container", self.url, exc)
            self.close()
        return daos_error(exc, what)

    def _call(self, what: str, fn, *args):
        try:
            return fn(*args)
        except pydaos.PyDError as exc:
            raise self._error(exc, what) from None

    def _manifests(self, fulls: list[str]) -> dict[str, _Manifest | None]:
        """Manifests of files in one directory, None where there is none."""
        if not fulls:
            return {}
        directory = _parent(fulls[0])
        names = self._names(directory)
        found: dict[str, bytes | None] = {}
        for batch in _batches(fulls, BATCH * 16):
            values = dict.fromkeys(batch)
            self._call(f"reading {self._where(directory)}", names.bget, values, MANIFEST_BUFFER)
            found.update(values)
        return {
            full: (_Manifest.decode(raw, self._where(full)) if raw is not None else None) for full, raw in found.items()
        }

    def _manifest(self, full: str) -> _Manifest | None:
        return self._manifests([full])[full]

    def _write_entry(self, full: str, manifest: _Manifest | None) -> None:
        """Set (or with None remove) the namespace entry of a file."""
        directory = _parent(full)
        value = manifest.encode() if manifest is not None else None
        self._call(f"writing {self._where(full)}", self._names(directory).put, full, value)

    def _mark_parents(self, directory: str) -> None:
        """Make `directory` and its ancestors listed in their parents, bottom-up (see _prune)."""
        while directory:
            parent = _parent(directory)
            self._call(f"writing {self._where(directory)}/", self._names(parent).put, directory + "/", DIR_MARKER)
            directory = parent

    def _is_empty(self, directory: str) -> bool:
        start = directory + "/"
        names = self._names(directory)
        try:
            return not any(key.startswith(start) for key in names)
        except pydaos.PyDError as exc:
            raise self._error(exc, f"listing {self._where(directory)}") from None

    def _prune(self, directory: str) -> None:
        """Unlist emptied directories, from `directory` up. Removing a marker and then looking
        again means a concurrent put (manifest first, then markers bottom-up) either is seen
        by the second look, which restores the markers up to the root, or writes its markers
        afterwards."""
        while directory and self._is_empty(directory):
            parent_names = self._names(_parent(directory))
            marker = directory + "/"
            self._call(f"unlisting {self._where(directory)}", parent_names.put, marker, None)
            if not self._is_empty(directory):
                # something raced in: list it again the way a put does (bottom-up to the root,
                # where another delete may have unlisted an ancestor meanwhile), then look again
                self._mark_parents(directory)
                continue
            directory = _parent(directory)

    def _landed(self, full: str, manifest: _Manifest) -> bool | None:
        """After a failed manifest write: whether it was applied anyway (a timeout can come after
        the server applied it); None when that cannot be known now."""
        try:
            current = self._manifest(full)
        except StoreError:
            return None
        return current is not None and current.data == manifest.data

    def _remove_replaced(self, replaced: _Manifest | None, manifest: _Manifest) -> None:
        # a retried put or move can find its own earlier write: same data, keep it
        if replaced is not None and replaced.data != manifest.data:
            self._remove_data([replaced])

    def _remove_data(self, manifests) -> None:
        """Remove the chunks of replaced or deleted files."""
        self._remove_chunks([key for manifest in manifests if manifest is not None for key in manifest.chunk_keys()])

    def _remove_chunks(self, keys: list[str]) -> None:
        """A failure only leaks space: no manifest refers to these chunks any more."""
        try:
            chunks = self._dict(CHUNKS_DICT)
            for batch in _batches(keys, REMOVE_BATCH):
                self._call("removing data chunks", chunks.bput, dict.fromkeys(batch))
        except StoreError as exc:
            log.warning("%d data chunks of %s stay behind: %s", len(keys), self.url, exc)

    # -- Store interface -----------------------------------------------------------------------

    def check(self) -> None:
        self._open()
        layout = self._dict(LAYOUT_DICT)
        values: dict = {"version": None, "shards": None, "chunk_size": None}
        self._call(f"reading the layout of {self.url}", layout.bget, values, MANIFEST_BUFFER)
        if values["version"] is None:  # a new container (or a mount that died while creating it)
            # the version last, in its own call: the keys of one bput land independently, so a
            # version present means the rest is (every mount writes the same values)
            self._call(
                f"writing the layout of {self.url}",
                layout.bput,
                {"shards": str(DEFAULT_SHARDS), "chunk_size": str(DEFAULT_CHUNK_SIZE)},
            )
            self._call(f"writing the layout of {self.url}", layout.bput, {"version": str(LAYOUT_VERSION)})
            values = dict.fromkeys(values)
            self._call(f"reading the layout of {self.url}", layout.bget, values, MANIFEST_BUFFER)
        try:
            version, shards, chunk_size = (int(values[k]) for k in ("version", "shards", "chunk_size"))
        except (TypeError, ValueError):
            raise StoreError(f"{self.url} has a damaged shufflefs layout: {values}", transient=False) from None
        if version != LAYOUT_VERSION:
            raise StoreError(
                f"{self.url} uses shufflefs layout version {version}; this shufflefs reads version {LAYOUT_VERSION}",
                transient=False,
            )
        self.shards, self.chunk_size = shards, chunk_size

    def put_file(self, key, path, abort=None, *, expect=None, token=None):
        full = self._full(key)
        what = f"uploading {self._where(full)}"
        if abort is not None and abort.is_set():
            raise UploadAborted(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(f"{what}: local file: {exc.strerror}", transient=exc.errno != errno.ENOENT) from None
        written: list[str] = []
        committed = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{what}: local path {path} is not a regular file", transient=False)
            manifest = _Manifest(st.st_size, time.time_ns(), uuid.uuid4().hex if st.st_size else "", self.chunk_size)
            chunk_keys = manifest.chunk_keys()
            chunks = self._dict(CHUNKS_DICT) if chunk_keys else None
            for batch_keys in _batches(chunk_keys, BATCH):
                if abort is not None and abort.is_set():
                    raise UploadAborted(key)
                first = len(written)
                batch = {chunk: self._read_chunk(fd, first + i, st.st_size, what) for i, chunk in enumerate(batch_keys)}
                written.extend(batch_keys)  # before the call: a failed bput may have stored some
                self._call(what, chunks.bput, batch)
            if abort is not None and abort.is_set():
                raise UploadAborted(key)
            replaced = self._manifest(full)
            try:
                self._write_entry(full, manifest)
            except StoreError:
                landed = self._landed(full, manifest)
                if landed is not True:
                    committed = landed is None  # unknown: keep the chunks it may refer to
                    raise
            committed = True
        except OSError as exc:
            raise StoreError(f"{what}: local file: {exc.strerror}") from None
        finally:
            os.close(fd)
            if written and not committed:
                self._remove_chunks(written)
        try:
            self._mark_parents(_parent(full))
        finally:
            self._remove_replaced(replaced, manifest)
        return None

    def _read_chunk(self, fd: int, index: int, size: int, what: str) -> bytes:
        length = min(self.chunk_size, size - index * self.chunk_size)
        data = os.pread(fd, length, index * self.chunk_size)
        if len(data) != length:
            raise StoreError(f"{what}: the local file shrank during the upload")
        return data

    def get_range(self, key, offset, length, *, expect=None):
        full = self._full(key)
        what = f"reading {self._where(full)}"
        for _attempt in (1, 2):
            manifest = self._manifest(full)
            if manifest is None:
                raise ObjectMissing(key)
            if expect is not None and manifest.data != expect:
                raise PreconditionFailed(key)
            end = min(offset + length, manifest.size)
            if length <= 0 or offset >= end:
                return b""
            first, last = offset // manifest.chunk_size, (end - 1) // manifest.chunk_size
            keys = manifest.chunk_keys(first, last)
            chunks = self._dict(CHUNKS_DICT)
            values: dict[str, bytes | None] = {}
            for batch in _batches(keys, BATCH):
                found = dict.fromkeys(batch)
                self._call(what, chunks.bget, found, manifest.chunk_size)
                values.update(found)
            if all(values[k] is not None for k in keys):
                data = b"".join(values[k] for k in keys)
                start = offset - first * manifest.chunk_size
                return data[start : start + end - offset]
            # replaced or deleted while we read: look at the manifest again, once
        missing = next(k for k in keys if values[k] is None)
        raise StoreError(f"{what}: data chunk {missing} is missing (the file keeps being replaced?)")

    def head(self, key):
        full = self._full(key)
        manifest = self._manifest(full)
        if manifest is None:
            return None
        return ObjectInfo(full.rsplit("/", 1)[-1], manifest.size, manifest.mtime_ns, manifest.data)

    def list_dir(self, prefix):
        directory = self._full(prefix)
        start = directory + "/" if directory else ""
        dirs, files = [], []
        try:
            for name in self._names(directory):
                if not name.startswith(start):
                    continue  # another directory sharing the shard
                rest = name[len(start) :]
                if rest.endswith("/") and "/" not in rest[:-1] and len(rest) > 1:
                    dirs.append(rest[:-1])
                elif rest and "/" not in rest:
                    files.append(name)
        except pydaos.PyDError as exc:
            raise self._error(exc, f"listing {self._where(directory)}") from None
        infos = [
            ObjectInfo(full[len(start) :], manifest.size, manifest.mtime_ns, manifest.data)
            for full, manifest in self._manifests(files).items()
            if manifest is not None
        ]
        return Listing(sorted(dirs), sorted(infos, key=lambda o: o.name))

    def move(self, src, dst, *, expect_src=None, expect_dst=None, token=None):
        src_full, dst_full = self._full(src), self._full(dst)
        manifest = self._manifest(src_full)
        if manifest is None:
            raise ObjectMissing(src)
        if src_full == dst_full:
            return None
        replaced = self._manifest(dst_full)
        self._write_entry(dst_full, manifest)
        try:
            self._mark_parents(_parent(dst_full))
            self._write_entry(src_full, None)
        finally:
            self._remove_replaced(replaced, manifest)
        try:  # the move is done; a retry would find no source and never get here
            self._prune(_parent(src_full))
        except StoreError as exc:
            log.warning("%s may stay listed while empty: %s", self._where(_parent(src_full)), exc)
        return None

    def delete_many(self, keys, *, expect=None):
        by_directory: dict[str, list[str]] = {}
        for key in keys:
            full = self._full(key)
            by_directory.setdefault(_parent(full), []).append(full)
        for directory, fulls in by_directory.items():
            manifests = self._manifests(fulls)
            names = self._names(directory)
            try:
                for batch in _batches(fulls, REMOVE_BATCH):
                    self._call(f"deleting in {self._where(directory)}", names.bput, dict.fromkeys(batch))
            except StoreError:
                self._remove_data_of_deleted(manifests)  # a retry would not find these manifests
                raise
            self._remove_data(manifests.values())
            self._prune(directory)
        return {}

    def _remove_data_of_deleted(self, manifests: dict[str, _Manifest | None]) -> None:
        """After a delete failed part-way: remove the data of the files that are gone."""
        try:
            now = self._manifests([full for full, manifest in manifests.items() if manifest is not None])
        except StoreError:
            return  # only space leaks
        self._remove_data(
            manifest
            for full, current in now.items()
            if (manifest := manifests[full]) is not None and (current is None or current.data != manifest.data)
        )
