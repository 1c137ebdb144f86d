"""Mounting the FUSE filesystem with mount(2) ourselves (as root), instead of through libfuse.

libfuse stats the mountpoint before mounting, which fails on a mount left by a dead daemon
(ENOTCONN). Calling mount(2) directly needs no stat, so a restarted daemon can mount *over*
the dead mount. That is what keeps consumers working: a mount made on top of a mount reaches
its peers and slaves in other mount namespaces, including bind mounts of the mountpoint made
from a shared or slave copy, such as a Kubernetes volume with HostToContainer propagation
(private copies are not reached). Lazily unmounting the dead mount first would not: such a
bind keeps the dead mount for good.

libfuse is then handed the open /dev/fuse descriptor as `/dev/fd/N`.
"""

from __future__ import annotations

import ctypes
import os
import re

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def mount_fuse(mountpoint: str, source: str, fstype: str, options: list[str]) -> int:
    """Mount a FUSE filesystem on `mountpoint` (over whatever is mounted there) and return the
    /dev/fuse descriptor that serves it; OSError on failure."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    # rootmode: the root is a directory (the mountpoint itself may not answer a stat)
    data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}",
                     *options])
    if _libc.mount(source.encode(), mountpoint.encode(), fstype.encode(), MS_NOSUID | MS_NODEV, data.encode()) != 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, os.strerror(error), mountpoint)
    return fd


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A path field of /proc/self/mountinfo or /proc/self/mounts as it is: the kernel writes
    some characters (space, tab, newline, backslash, ...) as a backslash and three octal
    digits; a backslash is itself escaped (\\134), so one pass decodes them all."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def top_mount(mountpoint: str) -> tuple[int, str] | None:
    """(mount id, device) of the topmost mount on `mountpoint` in this mount namespace; the pair
    identifies a mount even if its id is reused later."""
    top = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if len(fields) > 4 and unescape(fields[4]) == mountpoint:
                top = (int(fields[0]), fields[2])  # later lines were mounted later: on top
    return top


def unmount_if_ours(mountpoint: str, mount: tuple[int, str]) -> bool:
    """Lazily unmount `mountpoint` if its topmost mount is still `mount` (not when it was
    already unmounted from outside, which would detach whatever lies below)."""
    if top_mount(mountpoint) != mount:
        return False
    if _libc.umount2(mountpoint.encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error), mountpoint)
    return True
