"""mount(8) and umount(8) helpers: `mount -t fuse.shufflefs STORE_URL MOUNTPOINT -o
cache_size=20G,commit=async`, /etc/fstab lines like

    s3://bucket/spark  /mnt/spark-local  fuse.shufflefs  cache_size=20G,commit=async,_netdev,nofail  0 0

and `umount MOUNTPOINT`, which then drains pending uploads before the mount goes away.

mount(8) runs `mount.fuse.shufflefs SOURCE MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS] [-t TYPE]`,
umount(8) runs `umount.fuse.shufflefs MOUNTPOINT [-flnrv] [-N NS] [-t TYPE]` (both installed by
`shufflefs install-mount-helper`). The options are translated into `shufflefs mount` flags;
mount(8)'s generic ones are ignored. The exit status is 0 only once the mount is live (or gone,
for umount); 1 for a bad invocation or option, 32 (mount(8)'s "mount failure") when the
operation itself failed, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

from shufflefs.options import add_mount_arguments, parse_id
from shufflefs.stores import StoreError, check_endpoint_url

EXIT_USAGE = 1
EXIT_MOUNT_FAILURE = 32


def _endpoint(value: str) -> str:
    try:
        check_endpoint_url(value)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    return value


#: options whose value an error message must not repeat (it may hold a secret)
SECRET_OPTIONS = ("s3_endpoint_url",)


def _mount_flags() -> dict[str, argparse.Action]:
    """-o option -> the `shufflefs mount` flag it stands for (`cache_size` -> --cache-size), from
    the very parser of `shufflefs mount`: an option is checked as that flag is."""
    parser = argparse.ArgumentParser(add_help=False)
    add_mount_arguments(parser)
    flags = {}
    for action in parser._actions:
        long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if long_flags:
            flags[long_flags[0][2:].replace("-", "_")] = action
    return flags


OPTION_FLAGS = _mount_flags()
#: flags that are no mount options: a mount helper must return once mounted
NOT_OPTIONS = ("foreground", "ready_fd")
#: checks beyond the flag's own, before the value reaches a command line
EXTRA_CHECKS = {"s3_endpoint_url": _endpoint}
OWNER_OPTIONS = ("uid", "gid")
#: -o options that set the daemon's environment instead of a flag
ENV_OPTIONS = {"aws_profile": "AWS_PROFILE"}
#: mount(8)'s and the kernel's generic options: meaningless to shufflefs, accepted and ignored
GENERIC_OPTIONS = frozenset(
    {
        "defaults",
        "rw",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "nousers",
        "owner",
        "noowner",
        "group",
        "nogroup",
        "_netdev",
        "nofail",
        "async",
        "sync",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "suid",
        "nosuid",
        "loud",
        "silent",
        "mand",
        "nomand",
        "iversion",
        "noiversion",
        "allow_other",
        "default_permissions",
    }
)
GENERIC_PREFIXES = (
    "x-",
    "comment=",
    "fsname=",
    "subtype=",
    "helper=",
    "uhelper=",
    "user=",
    "context=",
    "fscontext=",
    "defcontext=",
    "rootcontext=",
)


class HelperError(Exception):
    def __init__(self, message: str, status: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status


class Invocation:
    """What mount(8) asked for."""

    def __init__(self):
        self.source = ""
        self.mountpoint = ""
        self.options: list[str] = []
        self.fake = False
        self.sloppy = False
        self.verbose = False
        self.lazy = False


def parse_invocation(argv: list[str], positionals: int = 2) -> Invocation:
    """mount.<type> SOURCE DIR [-sfnv] [-N NS] [-o OPTS] [-t TYPE], or with positionals=1
    umount.<type> DIR [-flnrv] [-N NS] [-t TYPE] (there -f is force, -l lazy)."""
    call = Invocation()
    umount = positionals == 1
    positional = []
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "-t", "-N"):
            value = next(args, None)
            if value is None:
                raise HelperError(f"{arg} needs a value")
            if arg == "-o":
                call.options.extend(o for o in value.split(",") if o)
            elif arg == "-N":
                raise HelperError("-N (mounting in another namespace) is not supported; run the mount there")
        elif arg.startswith("-o") and len(arg) > 2:
            call.options.extend(o for o in arg[2:].split(",") if o)
        elif arg.startswith("-") and len(arg) > 1:
            for flag in arg[1:]:
                if flag == "v":
                    call.verbose = True
                elif umount and flag == "l":
                    call.lazy = True
                elif umount and flag in "frd":  # force: it drains anyway; no read-only remount; no loop
                    continue
                elif not umount and flag == "f":
                    call.fake = True
                elif not umount and flag == "s":
                    call.sloppy = True
                elif flag != "n":  # no mtab to write
                    raise HelperError(f"unknown flag -{flag}")
        else:
            positional.append(arg)
    if len(positional) != positionals:
        raise HelperError(
            "usage: mount.fuse.shufflefs STORE_URL MOUNTPOINT [-o OPTIONS]"
            if positionals == 2
            else "usage: umount.fuse.shufflefs MOUNTPOINT"
        )
    if positionals == 2:
        call.source = positional[0]
    call.mountpoint = positional[-1]
    return call


def translate_options(options: list[str], sloppy: bool = False) -> tuple[list[str], dict[str, str]]:
    """-o options -> (`shufflefs mount` flags, environment for the daemon)."""
    flags: list[str] = []
    env: dict[str, str] = {}
    owner: dict[str, str] = {}
    for option in options:
        name, has_value, value = option.partition("=")
        if option in GENERIC_OPTIONS or option.startswith(GENERIC_PREFIXES):
            continue
        if option == "ro":
            raise HelperError("read-only mounts are not supported (shufflefs is Spark's scratch space); drop 'ro'")
        if name in NOT_OPTIONS:
            raise HelperError(f"mount option {name} is not allowed: a mount helper must return once mounted")
        action = OPTION_FLAGS.get(name)
        if action is not None and action.nargs == 0 and not has_value:  # a switch
            flags.append(action.option_strings[0])
            continue
        if action is not None or name in ENV_OPTIONS or name in OWNER_OPTIONS:
            if not has_value or not value:
                raise HelperError(f"mount option {name} needs a value: {name}=...")
            try:
                _check(name, action, value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                shown = name if name in SECRET_OPTIONS else repr(option)
                raise HelperError(f"invalid value in mount option {shown}: {exc}") from None
            if action is not None:
                flags += [action.option_strings[0], value]
            elif name in OWNER_OPTIONS:
                owner[name] = value
            else:
                env[ENV_OPTIONS[name]] = value
            continue
        if not sloppy:
            known = ", ".join(sorted({*OPTION_FLAGS, *ENV_OPTIONS, *OWNER_OPTIONS} - set(NOT_OPTIONS)))
            raise HelperError(
                f"unknown mount option {option!r} (shufflefs options: {known}; mount(8)'s generic ones are ignored)"
            )
    if owner:
        uid = owner.get("uid", owner.get("gid"))
        flags += ["--owner", f"{uid}:{owner.get('gid', uid)}"]
    return flags, env


def _check(name: str, action: argparse.Action | None, value: str) -> None:
    """Check `value` as `shufflefs mount` would (ValueError or ArgumentTypeError if wrong)."""
    if action is None:
        if name in OWNER_OPTIONS:
            parse_id(value)
        return
    if action.nargs == 0:
        raise ValueError("takes no value")
    converted = action.type(value) if callable(action.type) else value
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"use one of {', '.join(action.choices)}")
    if name in EXTRA_CHECKS:
        EXTRA_CHECKS[name](value)


def helper_command(program: str, argv: list[str]) -> tuple[Invocation, list[str], dict[str, str]]:
    """The `shufflefs` command a helper invocation stands for, and the daemon's environment."""
    shufflefs = [sys.executable, "-m", "shufflefs"]
    if os.path.basename(program).startswith("umount."):
        call = parse_invocation(argv, positionals=1)
        return call, [*shufflefs, "umount", call.mountpoint, *(["--lazy"] if call.lazy else [])], {}
    call = parse_invocation(argv)
    flags, env = translate_options(call.options, call.sloppy)
    return call, [*shufflefs, "mount", call.source, call.mountpoint, *flags], env


#: the helper mount(8) runs; `python` is the interpreter that has shufflefs installed
HELPER_SCRIPT = """#!/bin/sh
# mount(8)/umount(8) helper for shufflefs: mount -t fuse.shufflefs STORE_URL MOUNTPOINT -o OPTIONS
# (`shufflefs install-mount-helper` installs it as /sbin/mount.fuse.shufflefs, with links
# mount.shufflefs, umount.fuse.shufflefs and umount.shufflefs; it acts on the name it is run by)
cd / && exec {python} -m shufflefs.mount_helper "$0" "$@"
"""
#: names mount(8) and umount(8) look for, for -t fuse.shufflefs and -t shufflefs
HELPER_NAMES = ("mount.fuse.shufflefs", "mount.shufflefs", "umount.fuse.shufflefs", "umount.shufflefs")


def install(directory: str, python: str) -> list[str]:
    """Write the helper into `directory` under all its names; return the paths written."""
    first = os.path.join(directory, HELPER_NAMES[0])
    temporary = first + ".tmp"
    with open(temporary, "w") as f:
        f.write(HELPER_SCRIPT.format(python=shlex.quote(python)))
    os.chmod(temporary, 0o755)
    os.replace(temporary, first)
    paths = [first]
    for name in HELPER_NAMES[1:]:
        link = os.path.join(directory, name)
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(HELPER_NAMES[0], link)
        paths.append(link)
    return paths


def main(argv: list[str] | None = None) -> int:
    """argv: the name the helper was run by, then mount(8)'s arguments."""
    argv = sys.argv[1:] if argv is None else argv
    program = os.path.basename(argv[0]) if argv else "mount.fuse.shufflefs"
    try:
        call, command, env = helper_command(program, argv[1:])
    except HelperError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
        return exc.status
    if call.verbose or call.fake:
        print(f"{program}: " + " ".join(command[2:]), file=sys.stderr)
    if call.fake:
        return 0
    # `shufflefs mount` returns once the mount is live, `shufflefs umount` once it is drained
    # and gone; each prints its own one-line error
    result = subprocess.run(command, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    return 0 if result.returncode == 0 else EXIT_MOUNT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
