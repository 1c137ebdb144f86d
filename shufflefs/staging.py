"""Local files that hold the bytes of open, scratch, not-yet-uploaded and cached files.

A StagingFile is shared by the inode that owns it and by pending uploads that read it; it is
removed when the last of them lets go. The area counts the bytes all staging files hold, which
is what --cache-size bounds.

Creating a file costs far more than renaming one on common local filesystems (ext4 here: ~330 µs
of CPU against ~10 µs), and Spark creates thousands of short-lived files, so removed staging
files are truncated and kept for reuse, each reuse under a fresh name: a name is never used
twice, so a journal entry can never point at another file's bytes. Files a store may still
hold (`shared`: file:// hard-links uploads) are never reused. `housekeep` does the truncating
and removing in a worker thread, and creates empty files there when too few are left, so the
trio thread rarely waits for the file system.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid

import trio

log = logging.getLogger(__name__)

#: empty files kept ready for new()
READY_FILES = 64


class StagingFile:
    __slots__ = ("area", "path", "size", "refs", "shared", "_fd")

    def __init__(self, area: StagingArea, path: str, size: int):
        self.area = area
        self.path = path
        self.size = size
        self.refs = 1
        self.shared = False
        self._fd: int | None = None

    @property
    def fd(self) -> int:
        if self._fd is None:
            # no O_CREAT: a staging file that vanished must fail loudly, not read as empty
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def resize(self, new_size: int) -> None:
        self.area.bytes += new_size - self.size
        self.size = new_size

    def ref(self) -> StagingFile:
        self.refs += 1
        return self

    def unref(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.close_fd()
            self.area.bytes -= self.size
            self.area.adopted.pop(self.path, None)
            self.area.recycle(self)


class StagingArea:
    def __init__(self, directory: str, keep_free: int = 1024, ready_files: int = READY_FILES):
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.bytes = 0
        self.adopted: dict[str, StagingFile] = {}
        self.keep_free = keep_free
        self.ready_files = ready_files
        self.free: list[str] = []  # empty files ready for reuse
        # work for the housekeeping thread, when it runs (otherwise done on the spot)
        self._to_truncate: list[str] = []
        self._to_unlink: list[str] = []
        self._housekeeping = False
        self._work_waiting = trio.Event()

    async def housekeep(self) -> None:
        """Run until cancelled, keeping file-system work off the trio thread: truncate and
        remove files let go of, and keep `ready_files` empty files prepared for new()."""
        self._housekeeping = True
        try:
            while True:
                truncate, self._to_truncate = self._to_truncate, []
                unlink, self._to_unlink = self._to_unlink, []
                missing = max(0, self.ready_files - len(self.free) - len(truncate))
                if truncate or unlink or missing:
                    prepared = await trio.to_thread.run_sync(self._tidy, truncate, unlink, missing)
                    self.free += prepared
                    if len(prepared) < len(truncate) + missing:
                        await trio.sleep(5)  # the file system refuses: do not spin
                    continue
                self._work_waiting = trio.Event()
                await self._work_waiting.wait()
        finally:
            self._housekeeping = False

    def _tidy(self, truncate: list[str], unlink: list[str], create: int) -> list[str]:
        """(worker thread) Returns the files now empty and ready. Failures are logged: a file
        that could not be truncated or removed is left to the next start's clean-up."""
        ready = []
        for path in truncate:
            try:
                os.truncate(path, 0)
                ready.append(path)
            except OSError as exc:
                _log_unless_gone(exc)
        for path in unlink:
            try:
                os.unlink(path)
            except OSError as exc:
                _log_unless_gone(exc)
        for _ in range(create):
            path = os.path.join(self.directory, uuid.uuid4().hex)
            try:
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            except OSError as exc:  # e.g. a full disk: new() creates its own meanwhile
                log.warning("cannot prepare staging files: %s", exc)
                break
            ready.append(path)
        return ready

    def new(self) -> StagingFile:
        path = os.path.join(self.directory, uuid.uuid4().hex)
        staging = StagingFile(self, path, 0)
        if len(self.free) <= self.ready_files // 2:
            self._work_waiting.set()
        while self.free:
            try:
                os.rename(self.free.pop(), path)
                staging._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                return staging
            except FileNotFoundError:  # removed behind our back: try the next one
                continue
        staging._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return staging

    def recycle(self, staging: StagingFile) -> None:
        """The last reference to `staging` is gone: keep the file for reuse, or remove it."""
        reuse = not staging.shared and len(self.free) + len(self._to_truncate) < self.keep_free
        if reuse and staging.size == 0:
            self.free.append(staging.path)
            return
        truncate, unlink = ([staging.path], []) if reuse else ([], [staging.path])
        if self._housekeeping:
            self._to_truncate += truncate
            self._to_unlink += unlink
            self._work_waiting.set()
        else:
            self.free += self._tidy(truncate, unlink, 0)

    def copy(self, source: StagingFile) -> StagingFile:
        """A new staging file with the bytes of `source`."""
        staging = self.new()
        shutil.copyfile(source.path, staging.path)  # an in-kernel copy (sendfile) on Linux
        staging.resize(source.size)
        return staging

    def path_of(self, name: str) -> str:
        """The staging file called `name` (journals record names, not paths, so a cache dir
        keeps working when it is reached by another path)."""
        return os.path.join(self.directory, os.path.basename(name))

    def adopt(self, name: str) -> StagingFile:
        """Take over a staging file left by an earlier run (journal replay); adopting the same
        file twice gives the same object, with one more reference."""
        path = self.path_of(name)
        if path in self.adopted:
            return self.adopted[path].ref()
        size = os.stat(path).st_size
        self.bytes += size
        staging = self.adopted[path] = StagingFile(self, path, size)
        staging.shared = True  # an earlier run may have handed it to the store already
        return staging

    def remove_unreferenced(self, keep: set[str]) -> int:
        """Delete staging files of an earlier run that no pending operation needs."""
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.path not in keep:
                os.unlink(entry.path)
                removed += 1
        return removed


def _log_unless_gone(exc: OSError) -> None:
    if not isinstance(exc, FileNotFoundError):
        log.warning("staging clean-up: %s", exc)
