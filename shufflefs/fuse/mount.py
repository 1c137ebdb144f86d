"""Mounting the FUSE filesystem and getting the /dev/fuse descriptor that serves it.

As root we call mount(2) ourselves instead of going through libfuse. libfuse stats the
mountpoint before mounting, which fails on a mount left by a dead daemon (ENOTCONN). Calling
mount(2) directly needs no stat, so a restarted daemon can mount *over* the dead mount. That is
what keeps consumers working: a mount made on top of a mount reaches its peers and slaves in
other mount namespaces, including bind mounts of the mountpoint made from a shared or slave
copy, such as a Kubernetes volume with HostToContainer propagation (private copies are not
reached). Lazily unmounting the dead mount first would not: such a bind keeps the dead mount
for good.

Other users may not call mount(2) for FUSE, so they go through the setuid `fusermount3`, as
libfuse does: it checks that the user may mount there, mounts, and passes the open /dev/fuse
descriptor back over a Unix socket named by `_FUSE_COMMFD`. fusermount3 stats the mountpoint
too, so mounting over a dead mount stays root's privilege.

Either way the caller gets the descriptor: our own session reads it directly; the pyfuse3
adapter hands it to libfuse as `/dev/fd/N`.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import socket
import subprocess

from shufflefs.places import unescape

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
    data = ",".join([f"fd={fd}", "rootmode=40000", f"user_id={os.getuid()}", f"group_id={os.getgid()}", *options])
    if _libc.mount(source.encode(), mountpoint.encode(), fstype.encode(), MS_NOSUID | MS_NODEV, data.encode()) != 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise OSError(error, os.strerror(error), mountpoint)
    return fd


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


FUSERMOUNT = "fusermount3"
#: seconds fusermount3 may take; it stats the mountpoint, which can hang on a dead network mount
FUSERMOUNT_TIMEOUT = 60.0


class FusermountError(OSError):
    """fusermount3 failed; `strerror` and str() are its own message, on one line (it reports no errno)."""

    def __init__(self, message: str):
        super().__init__(None, message)

    def __str__(self) -> str:
        return self.strerror or ""


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _fusermount_option(option: str) -> str:
    # fusermount3 splits -o at commas, and a backslash escapes the next character (as libfuse's
    # fuse_opt_add_opt_escaped does): an fsname may be any store URL
    return option.replace("\\", "\\\\").replace(",", "\\,")


def _receive_fds(sock: socket.socket) -> list[int]:
    """The descriptors of one SCM_RIGHTS message (none at end-of-file), already close-on-exec:
    socket.recv_fds ignores its flags before Python 3.13, so it cannot pass MSG_CMSG_CLOEXEC."""
    fds = array.array("i")
    # room for more than the one expected, so that extra descriptors are closed, not truncated
    _, ancillary, _, _ = sock.recvmsg(1, socket.CMSG_SPACE(4 * fds.itemsize), socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def mount_with_fusermount(mountpoint: str, options: list[str]) -> int:
    """Mount a FUSE filesystem on `mountpoint` through fusermount3 (fsname=, subtype=,
    allow_other, default_permissions, ...; not auto_unmount, which keeps fusermount3 running)
    and return the /dev/fuse descriptor (close-on-exec) that serves it; FusermountError on failure."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = {**os.environ, "_FUSE_COMMFD": str(theirs.fileno())}
        try:
            process = subprocess.Popen(
                [FUSERMOUNT, "-o", ",".join(_fusermount_option(o) for o in options), "--", mountpoint],
                env=env,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            raise FusermountError(f"cannot run {FUSERMOUNT} (is fuse3 installed?): {exc.strerror}") from None
        # only fusermount3 may hold its end: when it exits without sending, we read end-of-file
        theirs.close()
        fds: list[int] = []
        try:
            ours.settimeout(FUSERMOUNT_TIMEOUT)
            fds = _receive_fds(ours)
            _, stderr = process.communicate(timeout=FUSERMOUNT_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            process.kill()
            process.wait()
            for fd in fds:
                os.close(fd)
            reason = "timed out" if isinstance(exc, (TimeoutError, subprocess.TimeoutExpired)) else exc.strerror
            raise FusermountError(f"{FUSERMOUNT} could not mount {mountpoint}: {reason}") from None
    finally:
        ours.close()
        theirs.close()
    if process.returncode != 0 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        message = _one_line(stderr) or f"exited with status {process.returncode} without a descriptor"
        raise FusermountError(f"{FUSERMOUNT} could not mount {mountpoint}: {message}")
    return fds[0]


def unmount_with_fusermount(mountpoint: str) -> None:
    """Lazily unmount `mountpoint` through fusermount3 (which refuses mounts the user did not
    make); FusermountError on failure."""
    try:
        done = subprocess.run(
            [FUSERMOUNT, "-u", "-z", "--", mountpoint],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=FUSERMOUNT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise FusermountError(f"{FUSERMOUNT} could not unmount {mountpoint}: timed out") from None
    except OSError as exc:
        raise FusermountError(f"cannot run {FUSERMOUNT} (is fuse3 installed?): {exc.strerror}") from None
    if done.returncode != 0:
        message = _one_line(done.stderr) or f"exited with status {done.returncode}"
        raise FusermountError(f"{FUSERMOUNT} could not unmount {mountpoint}: {message}")


def open_session_fd(
    mountpoint: str, source: str, fstype: str, options: list[str]
) -> tuple[int, tuple[int, str] | None]:
    """Mount `fstype` ("fuse" or "fuse.<subtype>") from `source` on `mountpoint` with the kernel
    `options` (allow_other, default_permissions) and return the /dev/fuse descriptor and, as
    root, the mount made (top_mount, for unmount_if_ours); None when fusermount3 mounted it."""
    if os.geteuid() == 0:
        fd = mount_fuse(mountpoint, source, fstype, options)
        made = top_mount(mountpoint)
        if made is None:  # cannot happen after a successful mount(2); without it we could not unmount
            os.close(fd)
            raise OSError(errno.EIO, "mounted, but the mount is not in /proc/self/mountinfo", mountpoint)
        return fd, made
    kind, _, subtype = fstype.partition(".")
    if kind != "fuse":
        raise ValueError(f"fusermount3 mounts only fuse or fuse.<subtype>, not {fstype}")
    named = [f"fsname={source}", *([f"subtype={subtype}"] if subtype else [])]
    return mount_with_fusermount(mountpoint, [*named, *options]), None


def unmount(mountpoint: str, made: tuple[int, str] | None) -> None:
    """Undo open_session_fd: as root only if the top mount is still the one `made` (a restarted
    daemon may have mounted over it), else lazily through fusermount3."""
    if made is not None:
        unmount_if_ours(mountpoint, made)
    else:
        unmount_with_fusermount(mountpoint)
