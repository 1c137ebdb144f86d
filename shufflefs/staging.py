"""Local files that hold the bytes of open, scratch, not-yet-uploaded and cached files.

A StagingFile is shared by the inode that owns it and by pending uploads that read it; it is
removed when the last of them lets go. The area counts the bytes all staging files hold, which
is what --cache-size bounds.
"""

from __future__ import annotations

import os
import uuid


class StagingFile:
    __slots__ = ("area", "path", "size", "refs", "_fd")

    def __init__(self, area: "StagingArea", path: str, size: int):
        self.area = area
        self.path = path
        self.size = size
        self.refs = 1
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

    def ref(self) -> "StagingFile":
        self.refs += 1
        return self

    def unref(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.close_fd()
            self.area.bytes -= self.size
            self.area.adopted.pop(self.path, None)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class StagingArea:
    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.bytes = 0
        self.adopted: dict[str, StagingFile] = {}

    def new(self) -> StagingFile:
        path = os.path.join(self.directory, uuid.uuid4().hex)
        staging = StagingFile(self, path, 0)
        staging._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return staging

    def copy(self, source: StagingFile) -> StagingFile:
        """A new staging file with the bytes of `source`."""
        staging = self.new()
        with open(source.path, "rb") as src:
            offset = 0
            while copied := os.sendfile(staging.fd, src.fileno(), offset, 1 << 30):
                offset += copied
        staging.resize(offset)
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
        return staging

    def remove_unreferenced(self, keep: set[str]) -> int:
        """Delete staging files of an earlier run that no pending operation needs."""
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.path not in keep:
                os.unlink(entry.path)
                removed += 1
        return removed
