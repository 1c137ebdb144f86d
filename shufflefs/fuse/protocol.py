"""The Linux FUSE kernel protocol (include/uapi/linux/fuse.h, 7.45): encode and decode only.

No I/O here. Layouts, numbers and bits were checked against the 7.45 header; the kernel's
own code was read where the header leaves semantics open (notify off/len, INIT reply).
Native byte order with standard sizes: the kernel and the daemon share one machine.
Times are packed signed ("q") although the header says uint64_t: the kernel reads them
as time64_t, so a pre-1970 time must be two's complement, and the bytes of positive
values are the same either way.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

KERNEL_VERSION = 7
KERNEL_MINOR = 45  # the newest minor this module knows
MIN_MINOR = 31  # the first minor we rely on
ROOT_ID = 1
MIN_READ_BUFFER = 8192
NAME_MAX = 1024  # FUSE_NAME_MAX, the kernel's limit for names in notifications
UNIQUE_RESEND = 1 << 63  # set in in_header.unique by kernels with HAS_RESEND

# enum fuse_opcode
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE, STATFS, RELEASE = range(8, 19)
FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT, OPENDIR = range(20, 28)
READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW, ACCESS, CREATE = range(28, 36)
INTERRUPT, BMAP, DESTROY, IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET = range(36, 43)
FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE, SETUPMAPPING = range(43, 49)
REMOVEMAPPING, SYNCFS, TMPFILE, STATX, COPY_FILE_RANGE_64 = range(49, 54)
CUSE_INIT = 4096

OPCODE_NAMES: dict[int, str] = {
    globals()[n.upper()]: n
    for n in (
        "lookup forget getattr setattr readlink symlink mknod mkdir unlink rmdir rename link open "
        "read write statfs release fsync setxattr getxattr listxattr removexattr flush init opendir "
        "readdir releasedir fsyncdir getlk setlk setlkw access create interrupt bmap destroy ioctl "
        "poll notify_reply batch_forget fallocate readdirplus rename2 lseek copy_file_range "
        "setupmapping removemapping syncfs tmpfile statx copy_file_range_64 cuse_init"
    ).split()
}

# INIT flags as one 64-bit value (fuse_init_in/out.flags | flags2 << 32), bits 0..42 in order
(
    ASYNC_READ,
    POSIX_LOCKS,
    FILE_OPS,
    ATOMIC_O_TRUNC,
    EXPORT_SUPPORT,
    BIG_WRITES,
    DONT_MASK,
    SPLICE_WRITE,
    SPLICE_MOVE,
    SPLICE_READ,
    FLOCK_LOCKS,
    HAS_IOCTL_DIR,
    AUTO_INVAL_DATA,
    DO_READDIRPLUS,
    READDIRPLUS_AUTO,
    ASYNC_DIO,
    WRITEBACK_CACHE,
    NO_OPEN_SUPPORT,
    PARALLEL_DIROPS,
    HANDLE_KILLPRIV,
    POSIX_ACL,
    ABORT_ERROR,
    MAX_PAGES,
    CACHE_SYMLINKS,
    NO_OPENDIR_SUPPORT,
    EXPLICIT_INVAL_DATA,
    MAP_ALIGNMENT,
    SUBMOUNTS,
    HANDLE_KILLPRIV_V2,
    SETXATTR_EXT,
    INIT_EXT,
    INIT_RESERVED,
    SECURITY_CTX,
    HAS_INODE_DAX,
    CREATE_SUPP_GROUP,
    HAS_EXPIRE_ONLY,
    DIRECT_IO_ALLOW_MMAP,
    PASSTHROUGH,
    NO_EXPORT_SUPPORT,
    HAS_RESEND,
    ALLOW_IDMAP,
    OVER_IO_URING,
    REQUEST_TIMEOUT,
) = (1 << bit for bit in range(43))

# fuse_open_out.open_flags, bits 0..7
(
    FOPEN_DIRECT_IO,
    FOPEN_KEEP_CACHE,
    FOPEN_NONSEEKABLE,
    FOPEN_CACHE_DIR,
    FOPEN_STREAM,
    FOPEN_NOFLUSH,
    FOPEN_PARALLEL_DIRECT_WRITES,
    FOPEN_PASSTHROUGH,
) = (1 << bit for bit in range(8))

# fuse_setattr_in.valid, bits 0..11
(
    FATTR_MODE,
    FATTR_UID,
    FATTR_GID,
    FATTR_SIZE,
    FATTR_ATIME,
    FATTR_MTIME,
    FATTR_FH,
    FATTR_ATIME_NOW,
    FATTR_MTIME_NOW,
    FATTR_LOCKOWNER,
    FATTR_CTIME,
    FATTR_KILL_SUIDGID,
) = (1 << bit for bit in range(12))

# enum fuse_notify_code
NOTIFY_POLL, NOTIFY_INVAL_INODE, NOTIFY_INVAL_ENTRY, NOTIFY_STORE, NOTIFY_RETRIEVE = range(1, 6)
NOTIFY_DELETE, NOTIFY_RESEND, NOTIFY_INC_EPOCH, NOTIFY_PRUNE = range(6, 10)

# Smaller flag sets of the request structs
RELEASE_FLUSH = 1 << 0  # fuse_release_in.release_flags
RELEASE_FLOCK_UNLOCK = 1 << 1
GETATTR_FH = 1 << 0  # fuse_getattr_in.getattr_flags
WRITE_CACHE = 1 << 0  # fuse_write_in.write_flags
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
READ_LOCKOWNER = 1 << 1  # fuse_read_in.read_flags
FSYNC_FDATASYNC = 1 << 0  # fuse_fsync_in.fsync_flags
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in/fuse_create_in.open_flags
EXPIRE_ONLY = 1 << 0  # fuse_notify_inval_entry_out.flags
FILESYSTEM_MAX_STACK_DEPTH = 2  # the kernel ignores PASSTHROUGH with a larger max_stack_depth

_S = struct.Struct
IN_HEADER = _S("=IIQQIIIHH")  # fuse_in_header, 40
OUT_HEADER = _S("=IiQ")  # fuse_out_header, 16
ATTR = _S("=QQQqqqIIIIIIIIII")  # fuse_attr, 88
ENTRY_OUT = _S("=QQQQII")  # fuse_entry_out up to attr, 40 (+88 = 128)
ATTR_OUT = _S("=QII")  # fuse_attr_out up to attr, 16 (+88 = 104)
GETATTR_IN = _S("=IIQ")  # 16
SETATTR_IN = _S("=IIQQQqqqIIIIIIII")  # 88
MKNOD_IN = _S("=IIII")  # 16
MKDIR_IN = _S("=II")  # 8
RENAME_IN = _S("=Q")  # 8
RENAME2_IN = _S("=QII")  # 16
LINK_IN = _S("=Q")  # 8
OPEN_IN = _S("=II")  # 8
CREATE_IN = _S("=IIII")  # 16
OPEN_OUT = _S("=QIi")  # fh, open_flags, backing_id: 16
READ_IN = _S("=QQIIQII")  # 40
WRITE_IN = _S("=QQIIQII")  # 40
WRITE_OUT = _S("=II")  # 8
RELEASE_IN = _S("=QIIQ")  # 24
FLUSH_IN = _S("=QIIQ")  # 24
FSYNC_IN = _S("=QII")  # 16
ACCESS_IN = _S("=II")  # 8
GETXATTR_IN = _S("=II")  # 8
GETXATTR_OUT = _S("=II")  # 8
SETXATTR_IN = _S("=IIII")  # 16; 8 (size, flags) unless SETXATTR_EXT was granted
FALLOCATE_IN = _S("=QQQII")  # 32
LSEEK_IN = _S("=QQII")  # 24
LSEEK_OUT = _S("=Q")  # 8
FORGET_IN = _S("=Q")  # 8
BATCH_FORGET_IN = _S("=II")  # count, dummy: 8, then count FORGET_ONE
FORGET_ONE = _S("=QQ")  # nodeid, nlookup: 16
INTERRUPT_IN = _S("=Q")  # 8
INIT_IN = _S("=IIIII")  # major, minor, max_readahead, flags, flags2
INIT_IN_V1 = _S("=IIII")  # what kernels before 7.36 send (no flags2)
INIT_OUT = _S("=IIIIHHIIHHIIH22x")  # fuse_init_out, 64
KSTATFS = _S("=QQQQQIIII24x")  # fuse_kstatfs (= fuse_statfs_out), 80
DIRENT_HEADER = _S("=QQII")  # fuse_dirent up to name, 24
NOTIFY_INVAL_INODE_OUT = _S("=Qqq")  # ino, off, len: 24
NOTIFY_INVAL_ENTRY_OUT = _S("=QII")  # parent, namelen, flags: 16
NOTIFY_DELETE_OUT = _S("=QQII")  # parent, child, namelen, padding: 24
BACKING_MAP = _S("=iIQ")  # fd, flags, padding: 16
BACKING_ID = _S("=I")  # the backing id FUSE_DEV_IOC_BACKING_CLOSE takes

ATTR_ZERO = bytes(ATTR.size)
DIRENTPLUS_HEADER_SIZE = ENTRY_OUT.size + ATTR.size + DIRENT_HEADER.size  # 152


def _ioc_layout() -> tuple[int, int, int, int]:
    """(dir shift, none, write, read) of the kernel's _IOC; asm-generic unless the arch differs."""
    machine = os.uname().machine
    if machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return 29, 1, 4, 2  # 13 size bits, 3 direction bits
    return 30, 0, 1, 2


_IOC_DIRSHIFT, _IOC_NONE, _IOC_WRITE, _IOC_READ = _ioc_layout()


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """The kernel's _IOC() from include/uapi/asm-generic/ioctl.h."""
    return (direction << _IOC_DIRSHIFT) | (size << 16) | (type_ << 8) | nr


def _IOR(type_: int, nr: int, size: int) -> int:
    """_IOR(): the kernel writes `size` bytes to userspace."""
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    """_IOW(): userspace passes `size` bytes to the kernel."""
    return _IOC(_IOC_WRITE, type_, nr, size)


FUSE_DEV_IOC_MAGIC = 229
FUSE_DEV_IOC_CLONE = _IOR(FUSE_DEV_IOC_MAGIC, 0, 4)  # uint32_t
FUSE_DEV_IOC_BACKING_OPEN = _IOW(FUSE_DEV_IOC_MAGIC, 1, BACKING_MAP.size)  # fuse_backing_map
FUSE_DEV_IOC_BACKING_CLOSE = _IOW(FUSE_DEV_IOC_MAGIC, 2, 4)  # uint32_t backing id


class ProtocolError(Exception):
    """The kernel spoke a protocol version or message shape this module cannot handle."""


def out_header(unique: int, body_len: int, error: int = 0) -> bytes:
    """fuse_out_header for a reply of body_len bytes; error is a positive errno."""
    return OUT_HEADER.pack(16 + body_len, -error, unique)


def error_reply(unique: int, error: int) -> bytes:
    """A complete reply: fuse_out_header alone, carrying -error."""
    return OUT_HEADER.pack(16, -error, unique)


_TTL_MAX = (1 << 63) - 1  # the kernel turns entry/attr_valid into a signed timespec64


def ttl_split(seconds: float) -> tuple[int, int]:
    """(seconds, nanoseconds) for fuse_entry_out/fuse_attr_out *_valid and *_valid_nsec."""
    if not seconds > 0:  # negative, zero and NaN: no caching
        return 0, 0
    if seconds >= _TTL_MAX:
        return _TTL_MAX, 0
    whole = int(seconds)
    nsec = round((seconds - whole) * 1e9)
    if nsec >= 1_000_000_000:  # 0.9999999999 rounds up into the next second
        return whole + 1, 0
    return whole, nsec


def attr(
    ino: int,
    size: int,
    blocks: int,
    atime_ns: int,
    mtime_ns: int,
    ctime_ns: int,
    mode: int,
    nlink: int,
    uid: int,
    gid: int,
    blksize: int,
) -> bytes:
    """A packed fuse_attr (rdev 0, flags 0)."""
    a, an = divmod(atime_ns, 1_000_000_000)
    m, mn = divmod(mtime_ns, 1_000_000_000)
    c, cn = divmod(ctime_ns, 1_000_000_000)
    return ATTR.pack(ino, size, blocks, a, m, c, an, mn, cn, mode, nlink, uid, gid, 0, blksize, 0)


def entry_out(nodeid: int, entry_ttl: float, attr_ttl: float, attr_bytes: bytes) -> bytes:
    """fuse_entry_out (generation 0). Negative entry: entry_out(0, ttl, 0, ATTR_ZERO)."""
    es, ens = ttl_split(entry_ttl)
    as_, ans = ttl_split(attr_ttl)
    return ENTRY_OUT.pack(nodeid, 0, es, as_, ens, ans) + attr_bytes


def attr_out(attr_ttl: float, attr_bytes: bytes) -> bytes:
    """fuse_attr_out."""
    s, ns = ttl_split(attr_ttl)
    return ATTR_OUT.pack(s, ns, 0) + attr_bytes


_PAD = (b"", b"\0" * 7, b"\0" * 6, b"\0" * 5, b"\0" * 4, b"\0" * 3, b"\0" * 2, b"\0")


def dirent(ino: int, next_offset: int, name: bytes, mode: int) -> bytes:
    """fuse_dirent + name, padded to FUSE_DIRENT_ALIGN (8); type is the DT_* of mode."""
    n = len(name)
    return DIRENT_HEADER.pack(ino, next_offset, n, (mode & 0o170000) >> 12) + name + _PAD[n & 7]


def direntplus(entry_out_bytes: bytes, ino: int, next_offset: int, name: bytes, mode: int) -> bytes:
    """fuse_direntplus: fuse_entry_out then fuse_dirent (the entry is 128 bytes, so same padding).

    The kernel takes a lookup reference for every entry with a non-zero nodeid except
    "." and "..", so the caller counts those lookups exactly like LOOKUP replies.
    """
    n = len(name)
    return entry_out_bytes + DIRENT_HEADER.pack(ino, next_offset, n, (mode & 0o170000) >> 12) + name + _PAD[n & 7]


def kstatfs(
    blocks: int, bfree: int, bavail: int, files: int, ffree: int, bsize: int, namelen: int, frsize: int
) -> bytes:
    """fuse_statfs_out (a fuse_kstatfs)."""
    return KSTATFS.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, 0)


def open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    """fuse_open_out; backing_id (from FUSE_DEV_IOC_BACKING_OPEN) counts with FOPEN_PASSTHROUGH."""
    return OPEN_OUT.pack(fh, open_flags, backing_id)


def write_out(size: int) -> bytes:
    """fuse_write_out."""
    return WRITE_OUT.pack(size, 0)


def notify_inval_inode(ino: int, offset: int = 0, length: int = 0) -> bytes:
    """Complete NOTIFY_INVAL_INODE message (fuse_notify_inval_inode_out).

    The kernel always drops the cached attributes. If offset >= 0 it also drops the page
    cache from offset for length bytes, to the end when length <= 0; a negative offset
    drops the attributes only.
    """
    return OUT_HEADER.pack(16 + NOTIFY_INVAL_INODE_OUT.size, NOTIFY_INVAL_INODE, 0) + NOTIFY_INVAL_INODE_OUT.pack(
        ino, offset, length
    )


def _check_notify_name(name: bytes) -> None:
    # the kernel takes namelen bytes then requires the size to match namelen + 1 exactly
    if len(name) > NAME_MAX or b"\0" in name:
        raise ValueError(f"name not usable in a notification: {name[:64]!r}")


def notify_inval_entry(parent: int, name: bytes, flags: int = 0) -> bytes:
    """Complete NOTIFY_INVAL_ENTRY message (fuse_notify_inval_entry_out + name + NUL)."""
    _check_notify_name(name)
    body_len = NOTIFY_INVAL_ENTRY_OUT.size + len(name) + 1
    return (
        OUT_HEADER.pack(16 + body_len, NOTIFY_INVAL_ENTRY, 0)
        + NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), flags)
        + name
        + b"\0"
    )


def notify_delete(parent: int, child: int, name: bytes) -> bytes:
    """Complete NOTIFY_DELETE message (fuse_notify_delete_out + name + NUL)."""
    _check_notify_name(name)
    body_len = NOTIFY_DELETE_OUT.size + len(name) + 1
    return (
        OUT_HEADER.pack(16 + body_len, NOTIFY_DELETE, 0)
        + NOTIFY_DELETE_OUT.pack(parent, child, len(name), 0)
        + name
        + b"\0"
    )


class Negotiated(NamedTuple):
    """What INIT settled. flags is the 64-bit set the reply grants (INIT_EXT included)."""

    major: int
    minor: int
    flags: int
    max_write: int
    max_readahead: int
    max_pages: int

    @property
    def retry(self) -> bool:
        """True when the kernel offered a newer major: it sends another INIT after our reply."""
        return self.major != KERNEL_VERSION


InitReply = Negotiated
_DEFAULT_MAX_PAGES = 32  # FUSE_DEFAULT_MAX_PAGES_PER_REQ, in force unless MAX_PAGES is granted


def negotiate(
    init_body: bytes | memoryview,
    *,
    want: int,
    max_write: int,
    max_readahead: int | None = None,
    max_pages: int = 256,
    max_background: int = 64,
    congestion_threshold: int = 48,
    time_gran: int = 1,
    max_stack_depth: int = 1,
) -> tuple[bytes, Negotiated]:
    """Parse fuse_init_in (the body after the in-header) and build the fuse_init_out body.

    granted = kernel flags & want. The kernel silently drops PASSTHROUGH when
    WRITEBACK_CACHE is also granted, so this does the same and says so in the flags.
    """
    if len(init_body) < INIT_IN_V1.size:
        raise ProtocolError(f"INIT body of {len(init_body)} bytes, need {INIT_IN_V1.size}")
    major, minor, k_readahead, k_flags = INIT_IN_V1.unpack_from(init_body)
    if major > KERNEL_VERSION:
        # fuse.h: answer with our major only, ignore the rest, the kernel sends a new INIT
        return (INIT_OUT.pack(KERNEL_VERSION, KERNEL_MINOR, *(0,) * 11), Negotiated(major, minor, 0, 0, 0, 0))
    if major != KERNEL_VERSION or minor < MIN_MINOR:
        raise ProtocolError(f"kernel FUSE protocol {major}.{minor}, need {KERNEL_VERSION}.{MIN_MINOR}+")
    ext = bool(k_flags & INIT_EXT) and minor >= 36 and len(init_body) >= INIT_IN.size
    if ext:
        k_flags |= INIT_IN.unpack_from(init_body)[4] << 32
    granted = k_flags & want & ~INIT_RESERVED
    if granted & PASSTHROUGH and granted & WRITEBACK_CACHE:
        granted &= ~PASSTHROUGH
    if granted & PASSTHROUGH and not 1 <= max_stack_depth <= FILESYSTEM_MAX_STACK_DEPTH:
        raise ValueError(f"max_stack_depth {max_stack_depth} outside 1..{FILESYSTEM_MAX_STACK_DEPTH}")
    if ext:
        granted |= INIT_EXT  # without it the kernel never reads flags2 of the reply
    else:
        granted &= 0xFFFF_FFFF
    readahead = k_readahead if max_readahead is None else min(k_readahead, max_readahead)
    pages = max_pages if granted & MAX_PAGES else 0
    reply = INIT_OUT.pack(
        KERNEL_VERSION,
        min(minor, KERNEL_MINOR),
        readahead,
        granted & 0xFFFF_FFFF,
        max_background,
        congestion_threshold,
        max_write,
        time_gran,
        pages,
        0,
        granted >> 32,
        max_stack_depth if granted & PASSTHROUGH else 0,
        0,
    )
    # the kernel raises max_write below 4096 to 4096
    return reply, Negotiated(
        KERNEL_VERSION, min(minor, KERNEL_MINOR), granted, max(max_write, 4096), readahead, pages or _DEFAULT_MAX_PAGES
    )


def read_buffer_size(max_write: int) -> int:
    """The smallest read(2) buffer the kernel accepts on /dev/fuse for this max_write."""
    return max(MIN_READ_BUFFER, IN_HEADER.size + WRITE_IN.size + max_write)


def decode_name(body: bytes | bytearray | memoryview, offset: int = 0) -> bytes:
    """The NUL-terminated name at body[offset:] (LOOKUP, UNLINK, after MKDIR_IN, CREATE_IN...)."""
    if type(body) is memoryview:
        body = body[offset:].tobytes()
        offset = 0
    end = body.find(b"\0", offset)
    if end < 0:
        raise ProtocolError("name in request is not NUL-terminated")
    return bytes(body[offset:end])


def decode_two_names(body: bytes | bytearray | memoryview, offset: int) -> tuple[bytes, bytes]:
    """(old name, new name) after RENAME_IN / RENAME2_IN; at offset 0, SYMLINK's (name, target)."""
    if type(body) is memoryview:
        body = body[offset:].tobytes()
        offset = 0
    end = body.find(b"\0", offset)
    end2 = body.find(b"\0", end + 1) if end >= 0 else -1
    if end2 < 0:
        raise ProtocolError("names in request are not NUL-terminated")
    return bytes(body[offset:end]), bytes(body[end + 1 : end2])
