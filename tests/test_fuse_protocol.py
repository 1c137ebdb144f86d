"""shufflefs.fuse.protocol against include/uapi/linux/fuse.h (7.45): no mount needed.

Expected sizes, numbers and bits are copied from the header by hand, not computed from the
module, so a wrong layout or constant fails here.
"""

import os
import stat
import struct
import sys

import pytest

from shufflefs.fuse import protocol as p

little = pytest.mark.skipif(sys.byteorder != "little", reason="hand-computed little-endian bytes")


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


@pytest.mark.parametrize(
    "name, size",
    [
        ("IN_HEADER", 40),
        ("OUT_HEADER", 16),
        ("ATTR", 88),
        ("ENTRY_OUT", 40),
        ("ATTR_OUT", 16),
        ("GETATTR_IN", 16),
        ("SETATTR_IN", 88),
        ("MKNOD_IN", 16),
        ("MKDIR_IN", 8),
        ("RENAME_IN", 8),
        ("RENAME2_IN", 16),
        ("LINK_IN", 8),
        ("OPEN_IN", 8),
        ("CREATE_IN", 16),
        ("OPEN_OUT", 16),
        ("READ_IN", 40),
        ("WRITE_IN", 40),
        ("WRITE_OUT", 8),
        ("RELEASE_IN", 24),
        ("FLUSH_IN", 24),
        ("FSYNC_IN", 16),
        ("ACCESS_IN", 8),
        ("GETXATTR_IN", 8),
        ("GETXATTR_OUT", 8),
        ("SETXATTR_IN", 16),
        ("FALLOCATE_IN", 32),
        ("LSEEK_IN", 24),
        ("LSEEK_OUT", 8),
        ("FORGET_IN", 8),
        ("BATCH_FORGET_IN", 8),
        ("FORGET_ONE", 16),
        ("INTERRUPT_IN", 8),
        ("INIT_IN", 20),
        ("INIT_IN_V1", 16),
        ("INIT_OUT", 64),
        ("KSTATFS", 80),
        ("DIRENT_HEADER", 24),
        ("NOTIFY_INVAL_INODE_OUT", 24),
        ("NOTIFY_INVAL_ENTRY_OUT", 16),
        ("NOTIFY_DELETE_OUT", 24),
        ("BACKING_MAP", 16),
    ],
)
def test_struct_sizes_match_header(name, size):
    assert getattr(p, name).size == size


def test_composite_sizes():
    # fuse_entry_out 128, fuse_attr_out 104, fuse_direntplus header 152
    assert p.ENTRY_OUT.size + p.ATTR.size == 128
    assert p.ATTR_OUT.size + p.ATTR.size == 104
    assert p.DIRENTPLUS_HEADER_SIZE == 152
    assert p.ATTR_ZERO == bytes(88)


def test_opcodes_match_header():
    expected = dict(
        LOOKUP=1,
        FORGET=2,
        GETATTR=3,
        SETATTR=4,
        READLINK=5,
        SYMLINK=6,
        MKNOD=8,
        MKDIR=9,
        UNLINK=10,
        RMDIR=11,
        RENAME=12,
        LINK=13,
        OPEN=14,
        READ=15,
        WRITE=16,
        STATFS=17,
        RELEASE=18,
        FSYNC=20,
        SETXATTR=21,
        GETXATTR=22,
        LISTXATTR=23,
        REMOVEXATTR=24,
        FLUSH=25,
        INIT=26,
        OPENDIR=27,
        READDIR=28,
        RELEASEDIR=29,
        FSYNCDIR=30,
        GETLK=31,
        SETLK=32,
        SETLKW=33,
        ACCESS=34,
        CREATE=35,
        INTERRUPT=36,
        BMAP=37,
        DESTROY=38,
        IOCTL=39,
        POLL=40,
        NOTIFY_REPLY=41,
        BATCH_FORGET=42,
        FALLOCATE=43,
        READDIRPLUS=44,
        RENAME2=45,
        LSEEK=46,
        COPY_FILE_RANGE=47,
        SETUPMAPPING=48,
        REMOVEMAPPING=49,
        SYNCFS=50,
        TMPFILE=51,
        STATX=52,
        COPY_FILE_RANGE_64=53,
    )
    for name, value in expected.items():
        assert getattr(p, name) == value, name
        assert p.OPCODE_NAMES[value] == name.lower()
    assert 7 not in p.OPCODE_NAMES and 19 not in p.OPCODE_NAMES
    assert p.OPCODE_NAMES[4096] == "cuse_init"


def test_init_flags_match_header():
    bits = dict(
        ASYNC_READ=0,
        POSIX_LOCKS=1,
        FILE_OPS=2,
        ATOMIC_O_TRUNC=3,
        EXPORT_SUPPORT=4,
        BIG_WRITES=5,
        DONT_MASK=6,
        SPLICE_WRITE=7,
        SPLICE_MOVE=8,
        SPLICE_READ=9,
        FLOCK_LOCKS=10,
        HAS_IOCTL_DIR=11,
        AUTO_INVAL_DATA=12,
        DO_READDIRPLUS=13,
        READDIRPLUS_AUTO=14,
        ASYNC_DIO=15,
        WRITEBACK_CACHE=16,
        NO_OPEN_SUPPORT=17,
        PARALLEL_DIROPS=18,
        HANDLE_KILLPRIV=19,
        POSIX_ACL=20,
        ABORT_ERROR=21,
        MAX_PAGES=22,
        CACHE_SYMLINKS=23,
        NO_OPENDIR_SUPPORT=24,
        EXPLICIT_INVAL_DATA=25,
        MAP_ALIGNMENT=26,
        SUBMOUNTS=27,
        HANDLE_KILLPRIV_V2=28,
        SETXATTR_EXT=29,
        INIT_EXT=30,
        INIT_RESERVED=31,
        SECURITY_CTX=32,
        HAS_INODE_DAX=33,
        CREATE_SUPP_GROUP=34,
        HAS_EXPIRE_ONLY=35,
        DIRECT_IO_ALLOW_MMAP=36,
        PASSTHROUGH=37,
        NO_EXPORT_SUPPORT=38,
        HAS_RESEND=39,
        ALLOW_IDMAP=40,
        OVER_IO_URING=41,
        REQUEST_TIMEOUT=42,
    )
    for name, bit in bits.items():
        assert getattr(p, name) == 1 << bit, name


def test_open_setattr_notify_constants():
    assert [
        p.FOPEN_DIRECT_IO,
        p.FOPEN_KEEP_CACHE,
        p.FOPEN_NONSEEKABLE,
        p.FOPEN_CACHE_DIR,
        p.FOPEN_STREAM,
        p.FOPEN_NOFLUSH,
        p.FOPEN_PARALLEL_DIRECT_WRITES,
        p.FOPEN_PASSTHROUGH,
    ] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert [
        p.FATTR_MODE,
        p.FATTR_UID,
        p.FATTR_GID,
        p.FATTR_SIZE,
        p.FATTR_ATIME,
        p.FATTR_MTIME,
        p.FATTR_FH,
        p.FATTR_ATIME_NOW,
        p.FATTR_MTIME_NOW,
        p.FATTR_LOCKOWNER,
        p.FATTR_CTIME,
        p.FATTR_KILL_SUIDGID,
    ] == [1 << i for i in range(12)]
    assert [
        p.NOTIFY_POLL,
        p.NOTIFY_INVAL_INODE,
        p.NOTIFY_INVAL_ENTRY,
        p.NOTIFY_STORE,
        p.NOTIFY_RETRIEVE,
        p.NOTIFY_DELETE,
        p.NOTIFY_RESEND,
        p.NOTIFY_INC_EPOCH,
        p.NOTIFY_PRUNE,
    ] == list(range(1, 10))
    assert p.KERNEL_MINOR >= 40 and p.MIN_MINOR == 31


@pytest.mark.skipif(not os.uname().machine.startswith(("x86", "aarch64", "arm")), reason="asm-generic _IOC layout")
def test_ioctl_numbers():
    # _IOR(229, 0, uint32_t), _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, uint32_t)
    assert p.FUSE_DEV_IOC_CLONE == 0x8004E500
    assert p.FUSE_DEV_IOC_BACKING_OPEN == 0x4010E501
    assert p.FUSE_DEV_IOC_BACKING_CLOSE == 0x4004E502


@little
def test_out_header_and_error_reply_bytes():
    assert p.error_reply(5, 2) == b"\x10\0\0\0" + b"\xfe\xff\xff\xff" + u64(5)
    assert p.out_header(0x0102030405060708, 8) == u32(24) + u32(0) + bytes(range(8, 0, -1))
    assert p.out_header(9, 0, 13) == p.error_reply(9, 13)


@little
def test_in_header_decodes_a_lookup():
    req = u32(42) + u32(1) + u64(77) + u64(1) + u32(1000) + u32(100) + u32(4242) + b"\0\0\0\0" + b"a.\0"
    assert p.IN_HEADER.unpack_from(req) == (42, 1, 77, 1, 1000, 100, 4242, 0, 0)
    assert p.decode_name(req, 40) == b"a."
    assert p.decode_name(memoryview(req), 40) == b"a."
    assert p.decode_name(bytearray(req)[40:]) == b"a."


def test_decode_two_names_and_errors():
    body = p.RENAME2_IN.pack(7, 1, 0) + b"old\0new-name\0"
    assert p.decode_two_names(body, 16) == (b"old", b"new-name")
    assert p.decode_two_names(memoryview(body), 16) == (b"old", b"new-name")
    with pytest.raises(p.ProtocolError):
        p.decode_name(b"abc")
    with pytest.raises(p.ProtocolError):
        p.decode_two_names(b"old\0new", 0)


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (0, (0, 0)),
        (-5.0, (0, 0)),
        (float("nan"), (0, 0)),
        (10, (10, 0)),
        (1.5, (1, 500_000_000)),
        (2.675, (2, 675_000_000)),
        (0.000000001, (0, 1)),
        (0.9999999999, (1, 0)),
        (1e30, (2**63 - 1, 0)),
        (float("inf"), (2**63 - 1, 0)),
    ],
)
def test_ttl_split(seconds, expected):
    assert p.ttl_split(seconds) == expected


@little
def test_attr_bytes_and_pre_1970_time():
    a = p.attr(2, 4096, 8, -1, 1_700_000_000_123_456_789, 5, stat.S_IFREG | 0o644, 1, 1000, 100, 4096)
    assert len(a) == 88
    assert a[:24] == u64(2) + u64(4096) + u64(8)
    assert a[24:32] == b"\xff" * 8  # atime -1 s ...
    assert a[32:40] == u64(1_700_000_000) and a[40:48] == u64(0)
    assert a[48:60] == u32(999_999_999) + u32(123_456_789) + u32(5)  # ... + 999999999 ns
    assert a[60:88] == u32(0o100644) + u32(1) + u32(1000) + u32(100) + u32(0) + u32(4096) + u32(0)


@little
def test_entry_out_and_negative_entry():
    neg = p.entry_out(0, 1.5, 0, p.ATTR_ZERO)
    assert neg == u64(0) + u64(0) + u64(1) + u64(0) + u32(500_000_000) + u32(0) + bytes(88)
    a = p.attr(3, 0, 0, 0, 0, 0, stat.S_IFDIR | 0o755, 2, 0, 0, 4096)
    e = p.entry_out(3, 60, 0.25, a)
    assert len(e) == 128 and e[40:] == a
    assert p.ENTRY_OUT.unpack_from(e) == (3, 0, 60, 0, 0, 250_000_000)
    ao = p.attr_out(2, a)
    assert ao == u64(2) + u32(0) + u32(0) + a and len(ao) == 104


@little
def test_dirent_padding():
    d = p.dirent(5, 7, b"abc", stat.S_IFREG | 0o644)
    assert d == u64(5) + u64(7) + u32(3) + u32(8) + b"abc" + b"\0" * 5
    assert len(p.dirent(1, 1, b"12345678", stat.S_IFDIR)) == 32  # already aligned
    assert len(p.dirent(1, 1, b"123456789", stat.S_IFDIR)) == 40
    assert len(p.dirent(1, 1, b"x", stat.S_IFLNK)) == 32
    assert struct.unpack_from("<I", p.dirent(1, 1, b"x", stat.S_IFLNK), 20)[0] == 10  # DT_LNK
    assert struct.unpack_from("<I", p.dirent(1, 1, b"x", stat.S_IFDIR), 20)[0] == 4  # DT_DIR


def test_direntplus_layout():
    e = p.entry_out(9, 1, 1, p.attr(9, 1, 1, 0, 0, 0, stat.S_IFREG, 1, 0, 0, 4096))
    d = p.direntplus(e, 9, 3, b"hello", stat.S_IFREG)
    assert len(d) == 128 + 24 + 8 and d[:128] == e
    assert d[128:] == p.dirent(9, 3, b"hello", stat.S_IFREG)


@little
def test_kstatfs_open_write_out():
    k = p.kstatfs(1, 2, 3, 4, 5, 4096, 255, 4096)
    assert k == u64(1) + u64(2) + u64(3) + u64(4) + u64(5) + u32(4096) + u32(255) + u32(4096) + bytes(28)
    assert p.open_out(3, p.FOPEN_PASSTHROUGH, 7) == u64(3) + u32(128) + u32(7)
    assert p.open_out(3, 0) == u64(3) + bytes(8)
    assert p.write_out(131072) == u32(131072) + u32(0)
    assert p.BACKING_MAP.pack(11, 0, 0) == u32(11) + bytes(12)


@little
def test_notify_inval_inode():
    m = p.notify_inval_inode(9)
    assert m == u32(40) + u32(2) + u64(0) + u64(9) + u64(0) + u64(0)
    m = p.notify_inval_inode(9, -1)  # attributes only
    assert m[24:32] == b"\xff" * 8
    m = p.notify_inval_inode(9, 4096, 8192)
    assert p.NOTIFY_INVAL_INODE_OUT.unpack_from(m, 16) == (9, 4096, 8192)


@little
def test_notify_inval_entry_and_delete():
    m = p.notify_inval_entry(1, b"ab")
    assert m == u32(35) + u32(3) + u64(0) + u64(1) + u32(2) + u32(0) + b"ab\0"
    assert p.notify_inval_entry(1, b"ab", p.EXPIRE_ONLY)[28:32] == u32(1)
    d = p.notify_delete(1, 5, b"xyz")
    assert d == u32(16 + 24 + 4) + u32(6) + u64(0) + u64(1) + u64(5) + u32(3) + u32(0) + b"xyz\0"
    with pytest.raises(ValueError):
        p.notify_inval_entry(1, b"a\0b")
    with pytest.raises(ValueError):
        p.notify_inval_entry(1, b"x" * 1025)


def kernel_init(major=7, minor=45, ra=131072, flags=0, flags2=0, size=64):
    body = struct.pack("=IIIII", major, minor, ra, flags, flags2)
    return (body + bytes(64))[:size]


KERNEL_FLAGS = (
    p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.BIG_WRITES | p.WRITEBACK_CACHE | p.MAX_PAGES | p.PARALLEL_DIROPS | p.INIT_EXT
)
WANT = p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.PARALLEL_DIROPS | p.MAX_PAGES | p.PASSTHROUGH


def fields(reply):
    assert len(reply) == 64
    keys = (
        "major minor max_readahead flags max_background congestion_threshold max_write "
        "time_gran max_pages map_alignment flags2 max_stack_depth request_timeout"
    ).split()
    return dict(zip(keys, p.INIT_OUT.unpack(reply)))


def test_negotiate_passthrough_granted_with_init_ext():
    reply, neg = p.negotiate(
        kernel_init(flags=KERNEL_FLAGS, flags2=1 << 5), want=WANT, max_write=1 << 20, max_readahead=65536
    )
    f = fields(reply)
    low = p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.PARALLEL_DIROPS | p.MAX_PAGES | p.INIT_EXT
    assert f["flags"] == low and f["flags2"] == 1 << 5
    assert f["max_stack_depth"] == 1 and f["max_pages"] == 256
    assert (f["major"], f["minor"], f["max_write"], f["max_readahead"]) == (7, 45, 1 << 20, 65536)
    assert (f["max_background"], f["congestion_threshold"], f["time_gran"]) == (64, 48, 1)
    assert neg == (7, 45, low | p.PASSTHROUGH, 1 << 20, 65536, 256) and not neg.retry


def test_negotiate_kernel_without_passthrough():
    reply, neg = p.negotiate(kernel_init(flags=KERNEL_FLAGS, flags2=0), want=WANT, max_write=131072)
    f = fields(reply)
    assert f["flags2"] == 0 and f["max_stack_depth"] == 0
    assert not neg.flags & p.PASSTHROUGH
    assert f["max_readahead"] == 131072  # the kernel's, when we set no limit


def test_negotiate_flags2_ignored_without_init_ext():
    reply, neg = p.negotiate(
        kernel_init(flags=KERNEL_FLAGS & ~p.INIT_EXT, flags2=1 << 5), want=WANT | p.INIT_EXT, max_write=131072
    )
    f = fields(reply)
    assert f["flags2"] == 0 and f["max_stack_depth"] == 0 and not f["flags"] & p.INIT_EXT
    assert neg.flags == p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.PARALLEL_DIROPS | p.MAX_PAGES


def test_negotiate_writeback_cache_excludes_passthrough():
    _, neg = p.negotiate(
        kernel_init(flags=KERNEL_FLAGS, flags2=1 << 5), want=WANT | p.WRITEBACK_CACHE, max_write=131072
    )
    assert neg.flags & p.WRITEBACK_CACHE and not neg.flags & p.PASSTHROUGH


def test_negotiate_max_pages_only_when_granted():
    reply, neg = p.negotiate(kernel_init(flags=KERNEL_FLAGS), want=WANT, max_write=131072, max_pages=64)
    assert fields(reply)["max_pages"] == 64 and neg.max_pages == 64
    reply, neg = p.negotiate(kernel_init(flags=KERNEL_FLAGS & ~p.MAX_PAGES), want=WANT, max_write=131072, max_pages=64)
    assert fields(reply)["max_pages"] == 0 and not fields(reply)["flags"] & p.MAX_PAGES
    assert neg.max_pages == 32  # the kernel's default then


def test_negotiate_old_and_new_minors():
    # 7.31 kernels send the 16-byte fuse_init_in
    reply, neg = p.negotiate(kernel_init(minor=31, flags=p.ASYNC_READ, size=16), want=WANT, max_write=131072)
    assert fields(reply)["minor"] == 31 and neg.minor == 31 and neg.flags == p.ASYNC_READ
    reply, neg = p.negotiate(kernel_init(minor=99, flags=KERNEL_FLAGS), want=WANT, max_write=1000)
    assert fields(reply)["minor"] == p.KERNEL_MINOR and neg.max_write == 4096


def test_negotiate_refuses_old_protocols():
    with pytest.raises(p.ProtocolError):
        p.negotiate(kernel_init(minor=30), want=WANT, max_write=131072)
    with pytest.raises(p.ProtocolError):
        p.negotiate(kernel_init(major=6, minor=99), want=WANT, max_write=131072)
    with pytest.raises(p.ProtocolError):
        p.negotiate(b"\x07\0\0\0", want=WANT, max_write=131072)


def test_negotiate_newer_major_asks_for_retry():
    reply, neg = p.negotiate(kernel_init(major=8, minor=0, flags=KERNEL_FLAGS), want=WANT, max_write=131072)
    f = fields(reply)
    assert (f["major"], f["minor"]) == (7, p.KERNEL_MINOR)
    assert reply[8:] == bytes(56)
    assert neg.retry and neg.major == 8


def test_read_buffer_size():
    assert p.read_buffer_size(1 << 20) == (1 << 20) + 80
    assert p.read_buffer_size(4096) == 8192
    assert p.read_buffer_size(0) == 8192
